"""The toy family's cases: the dense strategy's draws, as toy cases, with a designed row's features fixed."""

import dataclasses
from typing import Any, Optional

from harness.families.gpt.strategy import gpt_cases
from tests.families.toy.case import ToyCase


def toy_cases(layout: Any, impl: str = "lora.megatron", capabilities: Any = None, row: Optional[dict] = None) -> Any:
    # A designed row fixes the toy's two features; the dense strategy draws the rest (without dropout).
    dense = gpt_cases(layout, impl, capabilities, row=None if row is None else {**row, "targets": "names", "dropout": "none"})
    return dense.map(lambda case: ToyCase(**{f.name: getattr(case, f.name) for f in dataclasses.fields(case)}))
