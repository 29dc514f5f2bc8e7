"""The VLM family's case: a dense case whose shape is a LLaVA (``VLMShape``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from harness.cases import CaseError
from harness.families.gpt.case import GPTCase

__all__ = ["VLMCase"]


@dataclass(frozen=True)
class VLMCase(GPTCase):
    """One vision-language example: a ``harness.families.vlm.model.VLMShape`` (megatron-core's LLaVAModel).

    The task loops over all 16 combinations of VLMLoRA's three freeze flags
    and ``training`` itself, so ``training`` is not a drawn value here;
    ``lora`` holds the LoRA fields VLMLoRA shares with LoRA (patterns
    reaching into the vision tower and the projection, dim, alpha, init).
    """

    family: ClassVar[str] = "vlm"

    def __post_init__(self) -> None:
        super().__post_init__()
        from harness.families.vlm.model import VLMShape

        if not isinstance(self.shape, VLMShape):
            raise TypeError(f"VLMCase.shape must be a harness.families.vlm.model.VLMShape, got {type(self.shape).__name__}")

    def _check_shape(self) -> None:
        if self.layout.sp:
            raise CaseError(
                f"vlm case at layout {self.layout}: megatron-core's LLaVAModel supports sequence parallelism only "
                "with Transformer Engine's attention (an assert in its constructor); use a layout without -sp"
            )
        self.shape.check(self.layout.tp)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VLMCase":
        from harness.families.vlm.model import VLMShape

        base = GPTCase.from_json({**data, "shape": {}})
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(GPTCase)} | {"shape": VLMShape(**data["shape"])})

    def describe(self) -> str:
        s = self.shape
        vision = f"vision h{s.vision_hidden_size} img{s.img_size}/p{s.patch_dim} proj{s.projection_ffn_hidden_size} "
        return super().describe().replace(f"L{s.num_layers} ", f"L{s.num_layers} {vision}", 1)
