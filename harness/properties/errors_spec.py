"""errors_follow_spec: bad input gives the contract's error types and warnings, naming module and value."""

from __future__ import annotations

from harness.properties import Property, register
from harness.properties._gather import rank_findings
from harness.results import Check


def check(ev) -> Check:
    return rank_findings("errors_follow_spec", ev.errors)


PROPERTY = register(Property(
    pipeline=("gpt", "moe"),
    families=("gpt", "moe"),
    name="errors_follow_spec",
    check=check,
    needs=("errors",),
    kind="contract",
    # Its task tries bad inputs of its own on the example's shape: none of
    # the design's features (targets, training, dropout, init, dtypes) reach it.
    designed=False,
    doc="target and exclude both set, an unknown init method (A or B), a pattern selecting a module with no adapter, "
    "a rank TP cannot split, a pattern matching nothing (target or exclude): the contract's error type or warning",
))
