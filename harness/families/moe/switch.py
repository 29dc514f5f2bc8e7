"""The MoE adapter switch task: the base MoE GPTModel's logits, then the adapted model's through switching off and on."""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.evidence import RankRecord
from harness.families.gpt.model import causal_mask
from harness.families.moe.case import MoECase
from harness.families.moe.tasks import base_model, load_seeded_adapters
from harness.rules.adapters import moe_adapter_table
from harness.sharding import seeded_tensor
from harness.tasks.common import checked_table
from harness.tasks.switch import switch_evidence

__all__ = ["run_moe_switch_case"]


def run_moe_switch_case(ctx: Any, case: MoECase) -> RankRecord:
    """``SwitchExtras`` for the case's MoE model at its layout (eval mode, seeded base and adapter weights)."""
    from megatron.core import parallel_state as ps

    layout = case.layout
    impl, sizes, model = base_model(ctx, case)
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    full_x = seeded_tensor(case.seed, "input", (s, b, h)).to(case.model_dtype)
    x = full_x.chunk(tp, dim=0)[tp_rank] if layout.sp else full_x
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    forward = lambda m: m(ids, pos, causal_mask(s), decoder_input=x)  # noqa: E731
    model.eval()
    with torch.no_grad():
        base = forward(model).detach().to(dtype=torch.float64)
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**case.lora_kwargs())
    model = peft(model, training=case.training)
    table, broken = checked_table(lambda: moe_adapter_table(model, case, sizes), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    load_seeded_adapters(model, table, case, sizes)
    model.eval()
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=switch_evidence(peft, model, forward, base),
    )
