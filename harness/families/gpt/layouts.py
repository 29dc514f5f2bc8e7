"""The dense family's layout set: every power-of-two TP times every power-of-two EP (as data parallelism), TP > 1 also with SP."""

from __future__ import annotations

from harness.layouts import ParallelLayout, powers_of_two


def layouts(max_tp: int, max_ep: int) -> list[ParallelLayout]:
    """A dense model has no experts, so EP changes what megatron-core builds only through the world
    size: a layout with EP=e runs in a world of lcm(tp, tp*e) ranks, i.e. with data parallelism e,
    where every data-parallel replica must hold and compute the same adapters."""
    found = {
        ParallelLayout(tp=tp, ep=ep, sp=sp)
        for tp in powers_of_two(max_tp)
        for ep in powers_of_two(max_ep)
        for sp in ((False, True) if tp > 1 else (False,))
    }
    return sorted(found, key=lambda layout: layout.sort_key)
