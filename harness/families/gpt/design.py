"""The dense family's designed features: targets levels, training, dropout, micro-batches, init, dtypes, MLP, groups, a2a."""

from __future__ import annotations

from typing import Any, Mapping

from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.design import DROPOUT_P, GROUPS_DOC, Factor, checkpoint_row, common_row, init_levels, loop_row, training_row
from harness.families import FamilyDesign
from harness.layouts import ParallelLayout

__all__ = ["DESIGN", "TARGETS"]

#: target_modules / exclude_modules per targets level.
TARGETS = {
    "names": {"target_modules": list(DEFAULT_TARGET_MODULES), "exclude_modules": []},
    "wildcards": {"target_modules": ["*linear_proj", "*.layers.*.mlp.linear_fc*", "*.layers.0.*.linear_qkv"],
                  "exclude_modules": []},
    # Exclude mode leaving the attention alone: nothing upstream of a layer's MLP trains
    # (what a checkpointed MLP's backward needs to see: harness/SPEC.md, "Activation recompute").
    "exclude": {"target_modules": [], "exclude_modules": ["linear_qkv", "linear_proj"]},
}


def factors(layout: ParallelLayout, caps: Capabilities) -> list[Factor]:
    out = [
        Factor("targets", tuple(TARGETS), "modules chosen by name, by wildcard, or in exclude mode (attention left alone)"),
        Factor("training", (True, False), "an optimizer step and gradients, or inference"),
        Factor("dropout", ("none", "pre", "post"), f"dropout off, or p={DROPOUT_P} before / after the adapter"),
        Factor("micro_batches", (1, 2), "gradients accumulated over one or two micro-batches"),
        Factor("init", init_levels(caps.init_methods), "(A, B) init methods"),
        Factor("lora_dtype", tuple(caps.lora_dtypes) or (None,), "adapter dtype (None: the base weight's)"),
        Factor("model_dtype", ("float64", "float32", "bfloat16"), "base model dtype"),
        Factor("gated", (True, False), "gated (SwiGLU-style) MLP: fc1 holds gate and up"),
        Factor("bias", (False, True), "biased linears"),
        Factor("query_groups", (2, 1), GROUPS_DOC),
    ]
    if layout.sp and caps.a2a:
        out.append(Factor("a2a", (False, True), "a2a_experimental under sequence parallelism"))
    return out


def valid(row: Mapping[str, Any]) -> bool:
    """The rules the harness's exact comparisons impose on a dense example."""
    if not row["training"] and row["micro_batches"] != 1:
        return False  # inference runs one forward pass
    if row["training"] and row["dropout"] != "none":
        # Training dropout compares through value-keyed masks: float64 values on both sides.
        return row["model_dtype"] == "float64" and row["lora_dtype"] in (None, "float64")
    return True


def row_of_case(case: Mapping[str, Any]) -> dict[str, Any]:
    lora = case.get("lora") or {}
    out = common_row("gpt", case) | training_row(case)
    out["micro_batches"] = int(case.get("micro_batches", 1) or 1)
    out["model_dtype"] = case.get("model_dtype", "float32")
    out["a2a"] = bool(lora.get("a2a_experimental", False))
    return out | loop_row(case) | checkpoint_row(case)


DESIGN = FamilyDesign(factors=factors, row_of_case=row_of_case, targets=TARGETS, valid=valid)
