"""Missing API: a LoRA object without enable_adapter_layers / disable_adapter_layers / disable_adapter."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    enable_adapter_layers = None
    disable_adapter_layers = None
    disable_adapter = None
