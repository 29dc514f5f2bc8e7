"""The dense family's layout set: every power-of-two TP times every power-of-two EP (as data parallelism), TP > 1
with and without SP (with data parallelism, with SP only); with ``--pp`` > 1 also pipeline layouts."""

from __future__ import annotations

from harness.layouts import ParallelLayout, powers_of_two

#: Virtual pipeline stages of the interleaved pipeline layouts (model chunks per pipeline rank).
VIRTUAL_STAGES = 2


def layouts(max_tp: int, max_ep: int, max_pp: int = 1) -> list[ParallelLayout]:
    """A dense model has no experts, so EP changes what megatron-core builds only through the world
    size: a layout with EP=e runs in a world of lcm(tp, tp*e) ranks, i.e. with data parallelism e,
    where every data-parallel replica must hold and compute the same adapters.

    Pipeline layouts, for each power-of-two PP from 2 to ``max_pp``: ``tp1-pp<P>`` (one module per
    stage), ``tp1-pp<P>-vpp2`` (a list of two chunks per stage, megatron's interleaved schedule) and
    ``tp<max_tp>-pp<P>`` (TP inside every stage) when ``max_tp`` > 1. Three, not the product with
    every TP, EP and SP: the pipeline adds its own ways to fail (stage-local names, chunks, the
    point-to-point hand-over), which these exercise; how TP shards inside a stage is the same code
    as without a pipeline."""
    found = {
        ParallelLayout(tp=tp, ep=ep, sp=sp)
        for tp in powers_of_two(max_tp)
        for ep in powers_of_two(max_ep)
        for sp in ((False, True) if tp > 1 else (False,))
        # With data parallelism, TP > 1 runs with sequence parallelism only: TP without SP is exercised
        # without data parallelism, and DP's own paths (replicas, the gradient all-reduce) do not depend on
        # SP; the cut layout (tp2-ep2 at --tp 2 --ep 2) was ~45 s of the suite's matrix.
        if not (tp > 1 and ep > 1 and not sp)
    }
    for pp in powers_of_two(max_pp):
        if pp == 1:
            continue
        found |= {ParallelLayout(pp=pp), ParallelLayout(pp=pp, vpp=VIRTUAL_STAGES)}
        if max_tp > 1:
            found.add(ParallelLayout(tp=max_tp, pp=pp))
    return sorted(found, key=lambda layout: layout.sort_key)
