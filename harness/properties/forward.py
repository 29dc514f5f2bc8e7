"""forward_matches: the logits on every rank equal the reference's, on the same full weights.

16-bit cases compare errors against a float64 reference instead
(``harness.properties._gather.Numeric``).
"""

from __future__ import annotations

from harness.properties import Property, register
from harness.properties._gather import Numeric, layout_violations, no_adapter_reason
from harness.results import Check, Location



def check(ev) -> Check:
    broken = layout_violations("forward_matches", ev.impl)
    if broken is not None:
        return broken
    result = Check("forward_matches")
    result.vacuous = no_adapter_reason(ev.reference)
    numeric = Numeric(ev)
    for rec in ev.impl:
        numeric.compare(result, Location("output", None, (rec.rank,)), rec.output, lambda r: r.output)
    return result


PROPERTY = register(Property(
    pipeline=True,
    families=("gpt", "moe"),
    name="forward_matches",
    check=check,
    needs=("impl", "reference"),
    doc="logits on every rank equal the reference",
))
