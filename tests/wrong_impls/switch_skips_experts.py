"""Bug: switching off reaches the dense adapters only; expert adapters (sequential and grouped) stay on."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.expert_adapters import is_expert_wrapper
from lora.megatron.wrapper import is_adapter_wrapper


@dataclass
class LoRA(_CorrectLoRA):
    def disable_adapter_layers(self, model):
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            for module in chunk.modules():
                if is_adapter_wrapper(module) and not is_expert_wrapper(module):
                    module.disable_adapter_layers()
