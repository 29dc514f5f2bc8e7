"""The dense checkpoint tasks: save the case's adapters at its layout, load them at its load layout.

The save task runs the case at ``layout`` (its ``load_layout`` names where it will be loaded); the load
task runs the case with the two swapped, at the load layout, ``load_layout`` naming where it was saved.
Both name the checkpoint directory by the saved case (``harness.checkpoint.checkpoint_dir``).
"""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.checkpoint import checkpoint_case, checkpoint_dir
from harness.evidence import Partitioned, RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import build_gpt, causal_mask, dense_inputs, output_layer_gathers
from harness.sharding import load_full_adapter_weights, load_full_base_weights, seeded_tensor
from harness.tasks.checkpoint import LR, load_side, save_side
from harness.tasks.common import checked_table, setup

__all__ = ["run_gpt_checkpoint_save", "run_gpt_checkpoint_load"]


def _built(ctx: Any, case: GPTCase, adapter_seed: int) -> Any:
    """(LoRA object, adapted model, partition table, or a violation record) at the case's layout: seeded base,
    adapters loaded with ``adapter_seed``'s values."""
    impl, tp, tp_rank = setup(ctx, case)
    model = build_gpt(case.shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype,
                      parallel_output=not output_layer_gathers(case.contract))
    load_full_base_weights(model, case.seed, tp_rank, tp)
    kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**kwargs)
    model = peft(model, training=True)
    table, broken = checked_table(
        lambda: load_full_adapter_weights(model, adapter_seed, tp_rank, tp, kwargs.get("dim", 32)), ctx.rank, tp_rank, tp)
    return peft, model, table, broken, tp, tp_rank


def _io(ctx: Any, case: GPTCase, tp: int, tp_rank: int, table: Any) -> tuple[Any, Any, Any]:
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s = case.shape.seq_length
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)
    mask = causal_mask(s).to(device)

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return m(ids, pos, mask, decoder_input=x)

    def adapters(m: Any) -> dict[str, torch.Tensor]:
        return {p: m.get_parameter(p).detach() for p in table}

    def train_step_of(m: Any) -> Any:
        def step() -> None:
            out = m(ids, pos, mask, decoder_input=x)
            probe = seeded_tensor(case.seed, "checkpoint-probe", tuple(out.shape)).to(device=device, dtype=out.dtype)
            (out * probe).sum().div(out.numel()).backward()
            trainable = [p for p in m.parameters() if p.requires_grad and p.grad is not None]
            torch.optim.SGD(trainable, lr=LR).step()
        return step

    return logits, adapters, train_step_of


def _record(ctx: Any, tp: int, tp_rank: int, table: Any, extras: Any) -> RankRecord:
    from megatron.core import parallel_state

    partitions = {p: Partitioned(w, part.dim, part.gated, tuple(shape)) for p, (w, part, shape) in table.items()}
    return RankRecord(rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
                      output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions=partitions,
                      extras=extras)


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
    extras = load_side(peft, model, checkpoint_dir(ctx.owner_pid, checkpoint_case(saved)), logits, adapters)
    return _record(ctx, tp, tp_rank, table, extras)
