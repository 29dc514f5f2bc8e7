"""The MoE adapter switch task: the base MoE GPTModel's logits, then the adapted model's through switching off and
on; at a pipeline layout this rank's stage, its logits through megatron-core's schedule."""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.evidence import RankRecord
from harness.families.moe.case import MoECase
from harness.families.moe.stage import moe_io, moe_stage
from harness.families.moe.tasks import load_seeded_adapters
from harness.pipeline import chunks_of, global_view, handed_over
from harness.rules.adapters import moe_adapter_table
from harness.tasks.common import checked_table
from harness.tasks.switch import switch_evidence

__all__ = ["run_moe_switch_case"]


def run_moe_switch_case(ctx: Any, case: MoECase) -> RankRecord:
    """``SwitchExtras`` for the case's MoE model at its layout (eval mode, seeded base and adapter weights)."""
    from megatron.core import parallel_state as ps

    layout = case.layout
    impl, sizes, chunks = moe_stage(ctx, case)
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    io = moe_io(case, sizes)
    for chunk in chunks:
        chunk.eval()
    base = io.logits(handed_over(chunks, layout)).detach().to(dtype=torch.float64)
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**case.lora_kwargs())
    model = peft(handed_over(chunks, layout), training=case.training)
    view = global_view(chunks_of(model))
    table, broken = checked_table(lambda: moe_adapter_table(view, case, sizes), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    load_seeded_adapters(view, table, case, sizes)
    for chunk in chunks_of(model):
        chunk.eval()
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=switch_evidence(peft, model, io.logits, base, named=lambda m: global_view(chunks_of(m))),
    )
