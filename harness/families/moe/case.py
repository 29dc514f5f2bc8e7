"""The MoE family's case: a dense case whose shape has experts (``MoEShape``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from harness.cases import CaseError
from harness.families.gpt.case import GPTCase

__all__ = ["MoECase"]


@dataclass(frozen=True)
class MoECase(GPTCase):
    """One mixture-of-experts GPT example: a ``harness.families.moe.model.MoEShape`` (experts, top-k,
    expert widths, shared experts, token dispatcher, grouped or sequential experts).

    The layout's ETP and EP split the experts; ``lora`` may carry
    ``share_expert_adapters`` and ``normalize_moe_lora``.
    """

    family: ClassVar[str] = "moe"

    def __post_init__(self) -> None:
        super().__post_init__()
        from harness.families.moe.model import MoEShape

        if not isinstance(self.shape, MoEShape):
            raise TypeError(f"MoECase.shape must be a harness.families.moe.model.MoEShape, got {type(self.shape).__name__}")

    def _check_shape(self) -> None:
        layout, lora = self.layout, self.lora
        self.shape.check(layout.tp, layout.ep, layout.etp_size)
        if not layout.moe_trainable:
            raise CaseError(
                f"moe case at layout {layout}: TP={layout.tp} without sequence parallelism; megatron-core's "
                "MoELayer requires sequence_parallel=True for MoE at TP > 1 (use a layout with -sp)"
            )
        topk = self.shape.moe_router_topk
        dim = lora.get("dim", 32)
        if lora.get("normalize_moe_lora") and dim % topk:
            raise CaseError(
                f"moe case: normalize_moe_lora=True needs dim divisible by moe_router_topk, "
                f"but dim={dim} and moe_router_topk={topk}"
            )
        expert_rank = dim // topk if lora.get("normalize_moe_lora") else dim
        etp = layout.etp_size
        if isinstance(dim, int) and etp > 1 and expert_rank % etp:
            # SPEC's ValueError for such a rank is errors_follow_spec's to draw, not every property's.
            raise CaseError(
                f"moe case at layout {layout}: the experts' rank {expert_rank} (dim={dim}"
                f"{f' / moe_router_topk={topk}' if lora.get('normalize_moe_lora') else ''}) must be divisible by "
                f"ETP={etp} (a column-parallel expert linear splits A along the rank over the expert-TP group)"
            )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MoECase":
        from harness.families.moe.model import MoEShape

        base = GPTCase.from_json({**data, "shape": {}})
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(GPTCase)} | {"shape": MoEShape(**data["shape"])})

    def describe(self) -> str:
        s = self.shape
        experts = f"{s.num_experts}x top{s.moe_router_topk} {'grouped' if s.grouped else 'sequential'} {s.dispatcher}"
        if s.shared_expert_ffn_hidden_size:
            experts += " +shared"
        flags = "".join(
            f" {k}" for k in ("share_expert_adapters", "normalize_moe_lora") if self.lora.get(k)
        )
        return super().describe().replace(f"L{s.num_layers} ", f"L{s.num_layers} {experts}{flags} ", 1)
