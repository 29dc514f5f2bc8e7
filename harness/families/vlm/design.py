"""The VLM family's designed features: which part the targets reach, gated MLPs, biases (the task runs every freeze combination)."""

from __future__ import annotations

from typing import Any, Mapping

from harness.contract import Capabilities
from harness.design import Factor, common_row
from harness.families import FamilyDesign
from harness.layouts import ParallelLayout

__all__ = ["DESIGN", "TARGETS"]

#: target_modules / exclude_modules per targets level.
TARGETS = {
    "vision": {"target_modules": ["*vision_model*linear_qkv", "*vision_model.*linear_fc2"], "exclude_modules": []},
    "projection": {"target_modules": ["*vision_projection.*linear_fc*"], "exclude_modules": []},
    "language": {"target_modules": ["*.decoder.layers.0.*linear_fc1", "*language_model.*linear_proj", "output_layer"],
                 "exclude_modules": []},
    "exclude": {"target_modules": [], "exclude_modules": ["*language_model*"]},
}


def factors(layout: ParallelLayout, caps: Capabilities) -> list[Factor]:
    # The VLM task runs the 16 freeze-flag x training combinations itself,
    # and what it checks (which parameters train) does not depend on the
    # init method, which stays drawn (never zero).
    return [
        Factor("targets", tuple(TARGETS), "vision tower, projection, language model, or exclude mode"),
        Factor("gated", (True, False), "gated MLPs"),
        Factor("bias", (False, True), "biased linears"),
    ]


def row_of_case(case: Mapping[str, Any]) -> dict[str, Any]:
    return common_row("vlm", case, init=False)


DESIGN = FamilyDesign(factors=factors, row_of_case=row_of_case, targets=TARGETS)
