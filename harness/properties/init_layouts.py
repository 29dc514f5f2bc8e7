"""init_matches_layouts: the initial adapters, gathered, equal the implementation's own TP=1 draw.

SPEC: init is computed over the full matrix, so for one seed the initial
adapter is the same at every layout. Megatron-Bridge computes fans on the
shard, so under the ``bridge`` contract a difference is an advisory
contract finding, never a failure.
"""

from __future__ import annotations

from harness.compare import tolerance_for
from harness.properties import Property, register
from harness.properties._gather import compare_adapter_sets, replicas, layout_violations
from harness.results import Check



def check(ev) -> Check:
    broken = layout_violations("init_matches_layouts", ev.impl + [ev.impl_tp1])
    if broken is not None:
        return broken
    case = ev.case
    result = Check("init_matches_layouts")
    # Values are drawn over the full matrix and sliced: bit-identical when
    # right, so the tightest bound applies whatever the dtypes.
    tol = tolerance_for("float64", "float64")
    want = ev.impl_tp1.initial_adapters
    for ranks, got in replicas(ev.impl, case.layout, "initial_adapters"):
        compare_adapter_sets(
            result, "initial value", got, want, ranks, tol,
            kind="contract", sub="init_tp_independent", binding=case.contract == "strict",
        )
    return result


def _applies(layout, capabilities):
    if layout.pp > 1:
        # SPEC, "Pipeline stages": the promise is across TP and EP layouts.
        return ("at pp > 1 each pipeline stage draws its own adapters (SPEC: the same initial values are promised "
                "across TP and EP layouts, not across stage splits)")
    return "TP=1 compares the TP=1 draw with itself" if layout.tp == 1 and layout.ep == 1 else None


PROPERTY = register(Property(
    pipeline=True,
    families=("gpt", "moe"),
    name="init_matches_layouts",
    check=check,
    needs=("impl", "impl_tp1"),
    kind="contract",
    doc="initial adapters, gathered, equal the implementation's own TP=1 initialisation for the same seed",
    applies=_applies,
))
