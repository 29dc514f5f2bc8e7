"""Bug: VLMLoRA assumes every part exists: it counts each part's parameters before freezing, so a
model whose vision encoder is absent (a pipeline stage: vision_model / vision_projection None) raises
AttributeError instead of skipping the part as SPEC says."""

from dataclasses import dataclass

from lora.megatron import LoRA, LoRAMerge  # noqa: F401 - the module's API
from lora.megatron import VLMLoRA as _CorrectVLMLoRA


def _inner(model):
    if isinstance(model, (list, tuple)):
        model = model[0]
    return getattr(model, "llava_model", model)


@dataclass
class VLMLoRA(_CorrectVLMLoRA):
    def freeze_model(self, model, training=True):
        inner = _inner(model)
        self.part_sizes = {part: sum(p.numel() for p in getattr(inner, part).parameters())
                           for part in ("vision_model", "vision_projection", "language_model")}
        super().freeze_model(model, training)
