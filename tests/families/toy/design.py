"""The toy family's designed features: gated MLP on/off x biases on/off (every pair: four rows)."""

from typing import Any, Mapping

from harness.design import Factor, common_row
from harness.families import FamilyDesign

TARGETS = {"all": {"target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], "exclude_modules": []}}


def factors(layout: Any, caps: Any) -> list[Factor]:
    return [Factor("gated", (True, False), "gated MLP"), Factor("bias", (False, True), "biased linears")]


def row_of_case(case: Mapping[str, Any]) -> dict[str, Any]:
    return common_row("toy", case, init=False)


DESIGN = FamilyDesign(factors=factors, row_of_case=row_of_case, targets=TARGETS)
