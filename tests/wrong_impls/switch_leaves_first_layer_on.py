"""Bug: disable_adapter_layers switches off every adapter but those of the first transformer layer."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.wrapper import is_adapter_wrapper


@dataclass
class LoRA(_CorrectLoRA):
    def disable_adapter_layers(self, model):
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            for name, module in chunk.named_modules():
                if is_adapter_wrapper(module) and ".layers.0." not in f".{name}":
                    module.disable_adapter_layers()
