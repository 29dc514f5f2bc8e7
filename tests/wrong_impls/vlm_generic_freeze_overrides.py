"""Bug: VLMLoRA's freeze_model is the generic LoRA freeze, which freezes everything regardless of the flags.

A VLM subclass whose bases are in the wrong order (the generic LoRA's
freeze_model first), so a subtree left unfrozen by its flag is frozen
anyway and only adapters train.
"""

from dataclasses import dataclass

from lora.megatron import LoRAMerge  # noqa: F401 - the module's API
from lora.megatron import LoRA
from lora.megatron import VLMLoRA as _CorrectVLMLoRA


@dataclass
class VLMLoRA(_CorrectVLMLoRA):
    def freeze_model(self, model, training=True):
        LoRA.freeze_model(self, model, training)
