"""The dense training task: the case's GPTModel trained for the case's loop (harness.tasks.training).

At the case's layout the implementation's adapted model trains under
megatron-core's DDP and optimizer, each data-parallel replica on its own
data; in a world of size 1 with the reference (the loop names its
``replicas``) the reference's model trains with plain torch on the whole
global batch. Seeded full base and adapter weights (B non-zero) on both sides.
For a bf16 loop the reference also runs in float64 on the bf16 run's exact
values (``value_grid``: weights, inputs and probes rounded to bfloat16).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.evidence import Partitioned, RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import causal_mask
from harness.families.gpt.stage import adapted_stage
from harness.families.gpt.tasks import _grid, _round_to_grid
from harness.pipeline import merged, stage_gathered
from harness.sharding import seeded_tensor
from harness.tasks.common import setup
from harness.tasks.training import megatron_training, reference_training, replica_key, schedule_hooks, token_mask
from harness.training import loop_overrides, recompute_overrides

__all__ = ["run_gpt_training_case", "seeded_batches"]


def seeded_batches(case: Any, tp: int, tp_rank: int, logits_shape: tuple[int, ...], device: Any) -> Any:
    """(step, replica, micro-batch) -> (this rank's decoder input, the probe, zero at masked tokens
    (``token_mask``), the number of valid tokens): seeded full tensors, this rank's
    sequence shard of the input under SP; the same values on every layout, rounded to the case's value grid
    (``value_grid``: a float64 run on a bf16 run's exact values)."""
    from harness.cases import parse_dtype

    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    grid = None if case.value_grid is None else parse_dtype(case.value_grid[0])

    def x_of(name: str) -> torch.Tensor:
        full = _grid(seeded_tensor(case.seed, name, (s, b, h)), grid).to(device=device, dtype=case.model_dtype)
        return full.chunk(tp, dim=0)[tp_rank] if case.layout.sp else full

    def batches(step: int, replica: int, mb: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        tag = f"{step}.{replica}.{mb}"
        keep = token_mask(case.seed, tag, b, s)
        probe = _grid(seeded_tensor(case.seed, f"train-probe.{tag}", logits_shape), grid) * keep.unsqueeze(-1)
        return x_of(f"train.{tag}"), probe.to(device=device), int(keep.sum())

    return batches, x_of("heldout")


def run_gpt_training_case(ctx: Any, case: GPTCase) -> RankRecord:
    """``TrainingExtras`` for the case's dense model: megatron's loop at the layout, or the reference's."""
    from megatron.core import parallel_state

    loop = case.loop
    if loop is None:
        raise ValueError("a training task needs a case with a loop (harness.training.TrainingLoop)")
    is_reference = ctx.world_size == 1 and loop.replicas is not None
    impl, tp, tp_rank = setup(ctx, case)
    device = getattr(ctx, "device", None) or torch.device("cpu")
    layout = case.layout
    overrides = {} if is_reference else {**recompute_overrides(loop, "gpt", case.shape.add_bias_linear),
                                         **loop_overrides(loop)}
    built = adapted_stage(ctx, case, impl, tp, tp_rank, training=True, **overrides)
    if built.broken is not None:
        return built.broken
    model, view, table = built.model, built.view, built.table
    _round_to_grid(view, table, case)
    partitions = {p: Partitioned(w, part.dim, part.gated, tuple(shape)) for p, (w, part, shape) in table.items()}
    s, b = case.shape.seq_length, case.shape.micro_batch_size
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = causal_mask(s).to(device)

    def forward(m: Any, x: torch.Tensor) -> torch.Tensor:
        return m(ids, pos, mask, decoder_input=x)

    batches, heldout = seeded_batches(case, tp, tp_rank, (b, s, case.shape.vocab_size), device)

    def own() -> dict[str, torch.Tensor]:
        return {p: view.get_parameter(p).detach() for p in table}

    whole, pipeline = schedule_hooks(layout, ids, pos, mask, (b, s, case.shape.vocab_size))

    if is_reference:
        extras = reference_training(model, loop, batches, heldout, forward, own)
    else:
        keys = {p: replica_key(part.module, p, part.dim is not None, tp_rank, tp) for p, part in partitions.items()}
        extras = megatron_training(model, loop, case.model_dtype, parallel_state.get_data_parallel_rank(),
                                   batches, heldout, forward, own, keys, pipeline=pipeline if layout.pp > 1 else None,
                                   whole=whole)
    if layout.pp > 1:
        partitions = merged([st for st in stage_gathered(partitions)]) or {}
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions=partitions, extras=extras,
    )
