"""The dense checkpoint tasks: save the case's adapters at its layout, load them at its load layout.

The save task runs the case at ``layout`` (its ``load_layout`` names where it will be loaded); the load
task runs the case with the two swapped, at the load layout, ``load_layout`` naming where it was saved.
Both name the checkpoint directory by the saved case (``harness.checkpoint.checkpoint_dir``). At a pipeline
layout each side is a stage run through megatron-core's schedule (``harness.pipeline``), its adapters named
by global layer: a checkpoint saved at PP=2 loads at PP=1 and the other way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from harness.checkpoint import checkpoint_case, checkpoint_dir
from harness.evidence import Partitioned, RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import causal_mask, dense_inputs
from harness.families.gpt.stage import adapted_stage
from harness.pipeline import (
    chunks_of,
    global_view,
    merged,
    padded,
    run_schedule,
    stage_gathered,
    stage_input,
    stage_logits,
)
from harness.sharding import seeded_tensor
from harness.tasks.checkpoint import LR, load_side, save_side
from harness.tasks.common import setup

__all__ = ["run_gpt_checkpoint_save", "run_gpt_checkpoint_load"]


def _built(ctx: Any, case: GPTCase, adapter_seed: int) -> Any:
    """(LoRA object, adapted model, partition table, or a violation record) at the case's layout: seeded base,
    adapters loaded with ``adapter_seed``'s values. At a pipeline layout the model is this rank's stage as
    megatron hands it over (a module, or a list of chunks under virtual stages; ``harness.pipeline``), the
    table by the whole model's names."""
    impl, tp, tp_rank = setup(ctx, case)
    built = adapted_stage(ctx, case, impl, tp, tp_rank, training=True, adapter_seed=adapter_seed)
    return built.peft, built.model, built.table, built.broken, tp, tp_rank


def _io(ctx: Any, case: GPTCase, tp: int, tp_rank: int, table: Any) -> tuple[Any, Any, Any]:
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s, b = case.shape.seq_length, case.shape.micro_batch_size
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)
    mask = causal_mask(s).to(device)
    probe = seeded_tensor(case.seed, "checkpoint-probe", (b, s, case.shape.vocab_size)).to(device=device)

    forward = stage_input(ids, pos, mask)

    def logits(m: Any) -> torch.Tensor:
        """The held-out logits (every rank's copy of the last stage's under a pipeline)."""
        if case.layout.pp > 1:
            return stage_logits(chunks_of(m), forward, x, (b, s, case.shape.vocab_size), case.layout)
        with torch.no_grad():
            return chunks_of(m)[0](ids, pos, mask, decoder_input=x)

    def backward(m: Any) -> None:
        """The loss's forward and backward (through megatron's schedule under a pipeline)."""
        if case.layout.pp == 1:
            out = chunks_of(m)[0](ids, pos, mask, decoder_input=x)
            (out * probe.to(out.dtype)).sum().div(out.numel()).backward()
            return
        run_schedule(chunks_of(m), padded([{"x": x.detach(), "probe": probe}], case.layout), forward,
                     lambda out, batch: (out * batch["probe"].to(out.dtype)).sum().div(out.numel()),
                     seq_length=s, micro_batch_size=b)

    def adapters(m: Any) -> dict[str, torch.Tensor]:
        view = global_view(chunks_of(m))
        return {p: view.get_parameter(p).detach() for p in table}

    def train_step_of(m: Any) -> Any:
        def step() -> None:
            backward(m)
            trainable = [p for c in chunks_of(m) for p in c.parameters() if p.requires_grad and p.grad is not None]
            if trainable:  # a pipeline stage may hold no adapter
                torch.optim.SGD(trainable, lr=LR).step()
        return step

    return logits, adapters, train_step_of


def _record(ctx: Any, tp: int, tp_rank: int, table: Any, extras: Any) -> RankRecord:
    """This rank's record; under a pipeline every rank of the pipeline group holds the whole model's adapters
    and partitions (``stage_gathered``), so the parent puts them back together as at PP=1."""
    from megatron.core import parallel_state

    partitions = {p: Partitioned(w, part.dim, part.gated, tuple(shape)) for p, (w, part, shape) in table.items()}
    stages = stage_gathered((partitions, extras.adapters, extras.not_loaded))
    extras = dataclasses.replace(extras, adapters=merged([st[1] for st in stages]) or {},
                                 not_loaded=tuple(sorted({n for st in stages for n in st[2]})))
    return RankRecord(rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
                      output=None, input_grad=None, adapter_grads={}, initial_adapters={},
                      partitions=merged([st[0] for st in stages]) or {}, extras=extras)


def run_gpt_checkpoint_save(ctx: Any, case: GPTCase) -> RankRecord:
    """Train one step at the case's layout, record, save (``harness.tasks.checkpoint.save_side``)."""
    peft, model, table, broken, tp, tp_rank = _built(ctx, case, case.seed)
    if broken is not None:
        return broken
    logits, adapters, train_step_of = _io(ctx, case, tp, tp_rank, table)

    def fresh() -> Any:
        return _built(ctx, case, case.seed + 1)[1]

    extras = save_side(peft, model, checkpoint_dir(ctx.owner_pid, checkpoint_case(case)), ctx.rank, train_step_of(model),
                       logits, adapters, fresh)
    return _record(ctx, tp, tp_rank, table, extras)


def run_gpt_checkpoint_load(ctx: Any, case: GPTCase) -> RankRecord:
    """A fresh model at the case's layout (other adapter values) loads what the save task saved at the case's
    ``load_layout`` (``harness.tasks.checkpoint.load_side``)."""
    peft, model, table, broken, tp, tp_rank = _built(ctx, case, case.seed + 1)
    if broken is not None:
        return broken
    logits, adapters, _ = _io(ctx, case, tp, tp_rank, table)
    saved = case.with_(layout=case.load_layout, load_layout=case.layout)
    extras = load_side(peft, model, checkpoint_dir(ctx.owner_pid, checkpoint_case(saved)), logits, adapters,
                       lambda m: {id(p): n for n, p in global_view(chunks_of(m)).named_parameters()})
    return _record(ctx, tp, tp_rank, table, extras)
