"""The toy family's layouts: TP 1 and 2 (up to --tp), never SP, never EP."""

from harness.layouts import ParallelLayout, powers_of_two


def layouts(max_tp: int, max_ep: int) -> list[ParallelLayout]:
    return [ParallelLayout(tp=tp) for tp in powers_of_two(min(max_tp, 2))]
