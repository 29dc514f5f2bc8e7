"""The MoE family's layout set: every power-of-two TP, EP and expert-TP whose world fits, plus expert data parallelism."""

from __future__ import annotations

from harness.layouts import ParallelLayout, powers_of_two


def layouts(max_tp: int, max_ep: int, max_pp: int = 1) -> list[ParallelLayout]:
    """Every power-of-two TP, EP and ETP (ETP <= TP) whose world (lcm(tp, etp*ep)) is at most
    ``max_tp * max_ep``; TP > 1 always with sequence parallelism, which megatron-core's MoE layer
    requires; plus the largest layout with ETP=1 in the largest world, so experts have data
    parallelism of their own. ``--tp 2 --ep 2``: tp1, tp1-ep2 (data parallel 2), tp2-sp,
    tp2-etp1-sp (ETP != TP), tp2-ep2-etp1-sp (world 2), tp2-ep2-sp (world 4, data parallel 2) and
    tp2-ep2-etp1-dp2-sp (world 4: data parallel 2, expert data parallel 2)."""
    found = {
        ParallelLayout(tp=tp, ep=ep, etp=etp, sp=tp > 1)
        for tp in powers_of_two(max_tp)
        for ep in powers_of_two(max_ep)
        for etp in powers_of_two(tp)
        if ParallelLayout(tp=tp, ep=ep, etp=etp).min_world_size <= max_tp * max_ep
    }
    if max_tp > 1 and max_ep > 1:
        found.add(ParallelLayout(tp=max_tp, ep=max_ep, etp=1, sp=True, data_parallel=max_ep))
    # Pipeline layouts: experts placed over EP inside every stage (``tp1-ep<E>-pp<P>``, world E*P). One:
    # the pipeline's own ways to fail (stage-local names, the hand-over, stage-wise evidence) are the
    # dense family's; what MoE adds there is an expert layer per stage and the EP groups inside it.
    for pp in powers_of_two(max_pp):
        if pp > 1:
            found.add(ParallelLayout(ep=max_ep, pp=pp))
    return sorted(found, key=lambda layout: layout.sort_key)
