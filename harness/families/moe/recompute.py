"""The MoE recompute task: the case's MoE GPTModel trained one forward and backward without and with each recompute
setting; at a pipeline layout this rank's stage through megatron-core's schedule, its adapters' gradients by
global name."""

from __future__ import annotations

from typing import Any

import torch

from harness.evidence import RankRecord
from harness.families.moe.case import MoECase
from harness.families.moe.stage import adapted_moe_stage, moe_io
from harness.pipeline import chunks_of, padded, run_schedule, stage_gathered
from harness.sharding import seeded_tensor
from harness.tasks.common import cpu64
from harness.tasks.recompute import BrokenTable, adapter_gradients, probe_backward, recompute_evidence

__all__ = ["run_moe_recompute_case"]


def run_moe_recompute_case(ctx: Any, case: MoECase) -> RankRecord:
    """``RecomputeExtras`` for the case's MoE model at its layout (training, whatever the case's mode)."""
    from megatron.core import parallel_state as ps

    layout = case.layout
    s, b = case.shape.seq_length, case.shape.micro_batch_size
    sizes: dict[str, int] = {}

    # Every model stays alive until the task ends: no two runs of one example share an id()
    # (an implementation that remembers models by id() is judged on the models, not the allocator).
    alive: list[Any] = []

    def run(overrides: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        built = adapted_moe_stage(ctx, case, training=True, **overrides)
        sizes.update(built.sizes)
        if built.broken is not None:
            raise BrokenTable(built.broken)
        io = moe_io(case, built.sizes)
        probe = seeded_tensor(case.seed, "probe", (b, s, case.shape.vocab_size))
        alive.append(built.model)
        if layout.pp == 1:
            out = built.model(io.ids, io.pos, io.mask, decoder_input=io.x)
            probe_backward(out, probe.to(dtype=out.dtype))
            return cpu64(out), adapter_gradients(built.model)
        # Under a pipeline megatron's schedule runs backward (as the dense task's).
        outs = run_schedule(chunks_of(built.model), padded([{"x": io.x, "probe": probe}], layout), io.forward,
                            lambda o, batch: (o * batch["probe"].to(o.dtype)).sum(), seq_length=s, micro_batch_size=b)
        out = next(o for o in stage_gathered(cpu64(outs[0]) if outs else None) if o is not None)
        return out, adapter_gradients(built.view)

    try:
        extras = recompute_evidence("moe", run, case)
    except BrokenTable as exc:
        return exc.record
    return RankRecord(
        rank=ctx.rank, tp_rank=sizes.get("tp_rank", 0), tp_size=sizes.get("tp_size", 1), dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=extras,
    )
