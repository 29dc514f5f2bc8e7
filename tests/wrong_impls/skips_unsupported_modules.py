"""Bug: a pattern that selects a module with no adapter (a norm, an attention block) is skipped silently."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    def transform(self, module, name=None, prefix=None):
        try:
            return super().transform(module, name, prefix)
        except TypeError:
            return module
