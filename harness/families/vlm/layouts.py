"""The VLM family's layout set: TP 1 and the two largest powers of two up to the maximum; no SP, no EP."""

from __future__ import annotations

from harness.layouts import ParallelLayout, powers_of_two


def layouts(max_tp: int, max_ep: int, max_pp: int = 1) -> list[ParallelLayout]:
    """Never sequence parallelism (megatron-core's LLaVAModel asserts that it runs with Transformer
    Engine's attention, which CPU builds lack) and never EP (a LLaVA has no experts; data
    parallelism would only repeat what each replica checks). ``--tp 2``: tp1, tp2. With ``--pp`` > 1 also
    ``tp1-pp<P>``: the first stage holds the vision tower, the projection and the first language layers,
    the others language layers only (megatron's LLaVA with ``add_encoder`` on the first stage)."""
    found = [ParallelLayout(tp=tp) for tp in sorted({1, *powers_of_two(max_tp)[-2:]})]
    return found + [ParallelLayout(pp=pp) for pp in powers_of_two(max_pp) if pp > 1]
