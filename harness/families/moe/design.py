"""The MoE family's designed features: expert targets, expert kind, adapter sharing, shared experts, dispatcher, and the rest."""

from __future__ import annotations

from typing import Any, Mapping

from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.design import DROPOUT_P, GROUPS_DOC, Factor, common_row, init_levels, training_row
from harness.families import FamilyDesign
from harness.layouts import ParallelLayout

__all__ = ["DESIGN", "TARGETS", "targets_for"]

#: target_modules / exclude_modules per targets level.
TARGETS = {
    # Routed experts by wildcard (shared experts too, where the model has them).
    "experts": {"target_modules": ["*.experts.*linear_fc1", "*.experts.*linear_fc2"], "exclude_modules": []},
    # Plain names: dense attention, routed and shared experts alike.
    "names": {"target_modules": list(DEFAULT_TARGET_MODULES), "exclude_modules": []},
    "exclude": {"target_modules": [], "exclude_modules": ["linear_qkv"]},
}
_SHARED_PATTERN = "*shared_experts.linear_fc*"


def targets_for(level: str, shared_experts: bool = False) -> dict[str, list[str]]:
    """A targets level's lists; "experts" adds the shared experts where the model has them."""
    out = {k: list(v) for k, v in TARGETS[level].items()}
    if level == "experts" and shared_experts:
        out["target_modules"].append(_SHARED_PATTERN)
    return out


def factors(layout: ParallelLayout, caps: Capabilities) -> list[Factor]:
    exact = tuple(d for d in caps.lora_dtypes if d in (None, "float64")) or (None,)
    return [
        Factor("targets", tuple(TARGETS), "routed experts by wildcard, plain names, or exclude mode"),
        Factor("expert_kind", ("sequential", "grouped") if caps.grouped_experts else ("sequential",),
               "SequentialMLP or grouped experts"),
        Factor("share_expert_adapters", (True, False), "one adapter shared by the experts, or one per expert"),
        Factor("training", (True, False), "an optimizer step and gradients, or inference"),
        Factor("shared_experts", (False, True), "the layer has a shared expert"),
        Factor("dispatcher", ("alltoall", "allgather"), "token dispatcher"),
        Factor("dropout", ("none", "pre", "post"), f"dropout off, or p={DROPOUT_P} before / after the adapter"),
        Factor("init", init_levels(caps.init_methods), "(A, B) init methods"),
        Factor("lora_dtype", exact, "adapter dtype (MoE compares float64 values exactly)"),
        Factor("normalize_moe_lora", (False, True), "expert rank divided by top-k"),
        Factor("gated", (True, False), "gated expert MLPs"),
        Factor("query_groups", (2, 1), GROUPS_DOC),
    ]


def row_of_case(case: Mapping[str, Any]) -> dict[str, Any]:
    lora = case.get("lora") or {}
    shape = case.get("shape") or {}
    out = common_row("moe", case) | training_row(case)
    out["expert_kind"] = "grouped" if shape.get("grouped") else "sequential"
    out["share_expert_adapters"] = bool(lora.get("share_expert_adapters", True))
    out["shared_experts"] = shape.get("shared_expert_ffn_hidden_size") is not None
    out["dispatcher"] = shape.get("dispatcher", "alltoall")
    out["normalize_moe_lora"] = bool(lora.get("normalize_moe_lora", False))
    return out


DESIGN = FamilyDesign(factors=factors, row_of_case=row_of_case, targets=TARGETS, targets_for=targets_for,
                      triples=(("expert_kind", "share_expert_adapters", "training"),))
