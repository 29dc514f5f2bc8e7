"""forward_matches: the logits on every rank equal the reference's, on the same full weights."""

from __future__ import annotations

from harness.compare import compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import Check, Location



def check(ev) -> Check:
    broken = layout_violations("forward_matches", ev.impl)
    if broken is not None:
        return broken
    case = ev.case
    tol = tolerance_for(case.lora_dtype, case.model_dtype)
    result = Check("forward_matches")
    ref = ev.reference
    for rec in ev.impl:
        result.compare(Location("output", None, (rec.rank,)), compare_tensors(rec.output, ref.output, tol), tol)
    return result


PROPERTY = register(Property(
    families=("gpt", "moe"),
    name="forward_matches",
    check=check,
    needs=("impl", "reference"),
    doc="logits on every rank equal the reference",
))
