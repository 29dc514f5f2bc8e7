"""Bug: VLMLoRA leaves the vision projection trainable although freeze_vision_projection=True.

A freeze_model that walks only the vision tower and the language model (as
if the projection were part of neither), so the projector's base weights
stay trainable whatever its flag says.
"""

from dataclasses import dataclass

from lora.megatron import LoRA, LoRAMerge  # noqa: F401 - the module's API
from lora.megatron import VLMLoRA as _CorrectVLMLoRA


@dataclass
class VLMLoRA(_CorrectVLMLoRA):
    def freeze_model(self, model, training=True):
        flag = self.freeze_vision_projection
        self.freeze_vision_projection = False
        try:
            super().freeze_model(model, training)
        finally:
            self.freeze_vision_projection = flag
