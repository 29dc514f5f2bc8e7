"""The MoE training task: the case's MoE GPTModel trained for the case's loop (harness.tasks.training).

As the dense task (``harness.families.gpt.training``), with the MoE family's
adapter table: every step records the adapters *full* and by global name
(``harness.families.moe.tasks.assemble``), and the replica keys name each
shard by global name and its (E)TP shard, so a per-expert adapter is compared
across its expert-data-parallel replicas and a shared one across every EP
rank as well.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.evidence import Partitioned, RankRecord
from harness.families.gpt.model import causal_mask
from harness.families.gpt.training import seeded_batches
from harness.families.moe.case import MoECase
from harness.families.moe.stage import adapted_moe_stage
from harness.families.moe.tasks import assemble, full_partitions
from harness.pipeline import merged, stage_gathered
from harness.tasks.training import megatron_training, reference_training, replica_key, schedule_hooks
from harness.training import loop_overrides, recompute_overrides

__all__ = ["run_moe_training_case"]


def run_moe_training_case(ctx: Any, case: MoECase) -> RankRecord:
    """``TrainingExtras`` for the case's MoE model: megatron's loop at the layout, or the reference's."""
    from megatron.core import parallel_state as ps

    loop = case.loop
    if loop is None:
        raise ValueError("a training task needs a case with a loop (harness.training.TrainingLoop)")
    is_reference = ctx.world_size == 1 and loop.replicas is not None
    overrides = {} if is_reference else {**recompute_overrides(loop, "moe", case.shape.add_bias_linear),
                                         **loop_overrides(loop)}
    built = adapted_moe_stage(ctx, case, training=True, **overrides)
    if built.broken is not None:
        return built.broken
    model, view, table, sizes = built.model, built.view, built.table, built.sizes
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    layout = case.layout
    s, b = case.shape.seq_length, case.shape.micro_batch_size
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = causal_mask(s)

    def forward(m: Any, x: torch.Tensor) -> torch.Tensor:
        return m(ids, pos, mask, decoder_input=x)

    batches, heldout = seeded_batches(case, tp, tp_rank, (b, s, case.shape.vocab_size), torch.device("cpu"))

    def adapters() -> dict[str, torch.Tensor]:
        return assemble({p: view.get_parameter(p).detach() for p in table}, table, sizes)

    def raw() -> dict[str, torch.Tensor]:
        return {p: view.get_parameter(p).detach() for p in table}

    whole, pipeline = schedule_hooks(layout, ids, pos, mask, (b, s, case.shape.vocab_size))

    initial = adapters()
    if is_reference:
        extras = reference_training(model, loop, batches, heldout, forward, adapters)
    else:
        keys = {p: replica_key(info.module, info.global_name, info.part.dim is not None,
                               *((sizes["etp_rank"], sizes["etp_size"]) if info.group == "etp" else (tp_rank, tp)))
                for p, info in table.items()}
        extras = megatron_training(model, loop, case.model_dtype, ps.get_data_parallel_rank(), batches, heldout,
                                   forward, adapters, keys, raw=raw, pipeline=pipeline if layout.pp > 1 else None,
                                   whole=whole)
    partitions: dict[str, Partitioned] = full_partitions(table, initial)
    if layout.pp > 1:
        partitions = merged(stage_gathered(partitions)) or {}
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions=partitions, extras=extras,
    )
