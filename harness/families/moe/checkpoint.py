"""The MoE checkpoint tasks: save the case's adapters at its layout, load them at its load layout.

As the dense tasks (``harness.families.gpt.checkpoint``), with the MoE family's adapter table: what a
rank records is every adapter *full* and by global name (``harness.families.moe.tasks.assemble``: put
back together over expert-TP and collected over EP), so a checkpoint saved at one EP, ETP or TP size is
compared with what loads at another by the expert it belongs to. The training step before the save is
one forward and backward of the held-out batch, the gradients made what a data-parallel optimizer holds
(``_ddp_reduce``: expert-data-parallel replicas agree), and one plain SGD step. At a pipeline layout each
side is a stage run through megatron-core's schedule, every rank recording the whole model's adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from harness.checkpoint import checkpoint_case, checkpoint_dir
from harness.evidence import RankRecord
from harness.families.moe.case import MoECase
from harness.families.moe.stage import adapted_moe_stage, moe_io
from harness.families.moe.tasks import _ddp_reduce, assemble, full_partitions
from harness.pipeline import chunks_of, global_view, merged, padded, run_schedule, stage_gathered
from harness.sharding import seeded_tensor
from harness.tasks.checkpoint import LR, load_side, save_side

__all__ = ["run_moe_checkpoint_save", "run_moe_checkpoint_load"]


def _built(ctx: Any, case: MoECase, adapter_seed: int) -> Any:
    """(LoRA object, adapted model as the implementation returned it, sizes, adapter table, violation record or
    None) at the case's layout: seeded base, the implementation's LoRA, adapters loaded with ``adapter_seed``'s
    values; at a pipeline layout this rank's stage."""
    built = adapted_moe_stage(ctx, case, training=True, adapter_seed=adapter_seed)
    return built.peft, built.model, built.sizes, built.table, built.broken


def _io(ctx: Any, case: MoECase, sizes: dict[str, int], table: Any) -> tuple[Any, Any, Any]:
    """(held-out logits, whole adapters, the training step) of a model; the logits come back whole on every
    rank (the model gathers a vocab-parallel output itself: ``gpt_model_from_layer_spec``)."""
    s, b, vocab = case.shape.seq_length, case.shape.micro_batch_size, case.shape.vocab_size
    io = moe_io(case, sizes)
    probe = seeded_tensor(case.seed, "checkpoint-probe", (b, s, vocab))

    def adapters(m: Any) -> dict[str, torch.Tensor]:
        """Every adapter whole, by global name, on every rank (a pipeline stage's gathered with the others')."""
        view = global_view(chunks_of(m))
        mine = assemble({p: view.get_parameter(p).detach() for p in table}, table, sizes)
        return mine if case.layout.pp == 1 else merged(stage_gathered(mine)) or {}

    def loss(out: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        return (out * mine.to(out.dtype)).sum().div(b * s * vocab)

    def train_step_of(m: Any) -> Any:
        def step() -> None:
            chunks = chunks_of(m)
            if case.layout.pp == 1:
                loss(chunks[0](io.ids, io.pos, io.mask, decoder_input=io.x), probe).backward()
            else:
                run_schedule(chunks, padded([{"x": io.x, "probe": probe}], case.layout), io.forward,
                             lambda out, batch: loss(out, batch["probe"]), seq_length=s, micro_batch_size=b)
            view = global_view(chunks)
            _ddp_reduce(view, table, case.layout, ctx.world_size)
            trainable = [p for c in chunks for p in c.parameters() if p.requires_grad and p.grad is not None]
            if trainable:  # a pipeline stage may hold no adapter
                torch.optim.SGD(trainable, lr=LR).step()
        return step

    return io.logits, adapters, train_step_of


def _record(ctx: Any, sizes: dict[str, int], table: Any, extras: Any) -> RankRecord:
    """This rank's record: the adapters are whole already, so every partition is replicated (every stage's,
    under a pipeline); the adapters no loaded entry reached, by global name, from every rank of the world."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    everyone: list[Any] = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(everyone, tuple(extras.not_loaded))
    else:
        everyone = [tuple(extras.not_loaded)]
    extras = dataclasses.replace(extras, not_loaded=tuple(sorted({n for names in everyone for n in names})))
    full = {info.global_name: None for info in table.values()}
    partitions = full_partitions(table, extras.adapters or full)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        partitions = merged(stage_gathered(partitions)) or {}
    return RankRecord(rank=ctx.rank, tp_rank=sizes["tp_rank"], tp_size=sizes["tp_size"],
                      dp_rank=ps.get_data_parallel_rank(), output=None, input_grad=None, adapter_grads={},
                      initial_adapters={}, partitions=partitions, extras=extras)


def _names(table: Any) -> Any:
    """Each local adapter parameter's global name, by ``id`` (what ``load_side`` reports as not loaded)."""
    def names(m: Any) -> dict[int, str]:
        view = global_view(chunks_of(m))
        return {id(view.get_parameter(p)): info.global_name for p, info in table.items()}
    return names


def run_moe_checkpoint_save(ctx: Any, case: MoECase) -> RankRecord:
    """Train one step at the case's layout, record, save (``harness.tasks.checkpoint.save_side``)."""
    peft, model, sizes, table, broken = _built(ctx, case, case.seed)
    if broken is not None:
        return broken
    logits, adapters, train_step_of = _io(ctx, case, sizes, table)

    def fresh() -> Any:
        return _built(ctx, case, case.seed + 1)[1]

    extras = save_side(peft, model, checkpoint_dir(ctx.owner_pid, checkpoint_case(case)), ctx.rank,
                       train_step_of(model), logits, adapters, fresh)
    return _record(ctx, sizes, table, extras)


def run_moe_checkpoint_load(ctx: Any, case: MoECase) -> RankRecord:
    """A fresh model at the case's layout (other adapter values) loads what the save task saved at the case's
    ``load_layout`` (``harness.tasks.checkpoint.load_side``)."""
    peft, model, sizes, table, broken = _built(ctx, case, case.seed + 1)
    if broken is not None:
        return broken
    logits, adapters, _ = _io(ctx, case, sizes, table)
    saved = case.with_(layout=case.load_layout, load_layout=case.layout)
    names = _names(table)
    extras = load_side(peft, model, checkpoint_dir(ctx.owner_pid, checkpoint_case(saved)), logits, adapters, names,
                       own=lambda m: set(names(m).values()))
    return _record(ctx, sizes, table, extras)
