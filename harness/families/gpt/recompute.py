"""The dense recompute task: the case's GPTModel trained one forward and backward without and with each recompute setting."""

from __future__ import annotations

from typing import Any

import torch

from harness.evidence import RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import causal_mask, dense_inputs
from harness.families.gpt.stage import adapted_stage
from harness.pipeline import chunks_of, padded, run_schedule, stage_gathered, stage_input
from harness.sharding import seeded_tensor
from harness.tasks.common import cpu64, setup
from harness.tasks.recompute import BrokenTable, adapter_gradients, probe_backward, recompute_evidence

__all__ = ["run_gpt_recompute_case"]


def run_gpt_recompute_case(ctx: Any, case: GPTCase) -> RankRecord:
    """``RecomputeExtras`` for the case's dense model at its layout (training, whatever the case's mode); at a
    pipeline layout this rank's stage through megatron's schedule, its adapters' gradients by global name."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s = case.shape.seq_length
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)

    # Every model stays alive until the task ends: no two runs of one example share an id()
    # (an implementation that remembers models by id() is judged on the models, not the allocator).
    alive: list[Any] = []

    layout = case.layout
    mask = causal_mask(s).to(device)
    b = case.shape.micro_batch_size

    def run(overrides: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        # Every run from the same RNG states (megatron's model-parallel tracker included):
        # dropout draws the same masks with and without recompute.
        layout.initialize_megatron(ctx.world_size, seed=case.seed)
        built = adapted_stage(ctx, case, impl, tp, tp_rank, training=True, **overrides)
        if built.broken is not None:
            raise BrokenTable(built.broken)
        model, view = built.model, built.view
        probe = seeded_tensor(case.seed, "probe", (b, s, case.shape.vocab_size)).to(device=device)
        alive.append(model)
        if layout.pp == 1:
            out = model(ids, pos, mask, decoder_input=x)
            probe_backward(out, probe.to(out.dtype))
            return cpu64(out), adapter_gradients(model)
        # Under a pipeline megatron's schedule runs backward; the first stage's input does not require
        # grad (as the embedding's output under a frozen base), later stages' inputs are received.
        batches = padded([{"x": x, "probe": probe}], layout)
        outs = run_schedule(chunks_of(model), batches, stage_input(ids, pos, mask),
                            lambda o, batch: (o * batch["probe"].to(o.dtype)).sum(), seq_length=s, micro_batch_size=b)
        out = next(o for o in stage_gathered(cpu64(outs[0]) if outs else None) if o is not None)
        return out, adapter_gradients(view)

    try:
        extras = recompute_evidence("gpt", run, case)
    except BrokenTable as exc:
        return exc.record
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=extras,
    )
