"""errors_follow_spec: bad input gives the contract's error types and warnings, naming module and value."""

from __future__ import annotations

from harness.properties import Property, register
from harness.results import Check


def check(ev) -> Check:
    result = Check("errors_follow_spec")
    for rec in ev.errors:
        for f in rec.findings:
            result.fail(f"rank {rec.rank}: {f.message}", kind=f.kind, check=f.check, binding=f.binding)
    return result


PROPERTY = register(Property(
    name="errors_follow_spec",
    check=check,
    needs=("errors",),
    kind="contract",
    doc="target and exclude both set, an unknown init method (A or B), a pattern selecting a module with no adapter, "
    "a rank TP cannot split, a pattern matching nothing (target or exclude): the contract's error type or warning",
))
