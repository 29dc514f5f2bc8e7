"""Bug: disable_adapter switches the adapters back on only when its block ends normally (no try/finally)."""

import contextlib
from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    @contextlib.contextmanager
    def disable_adapter(self, model):
        self.disable_adapter_layers(model)
        yield
        self.enable_adapter_layers(model)
