"""The dense adapter switch task: the base GPTModel's logits, then the adapted model's through switching off and on."""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.evidence import RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import build_gpt, causal_mask, dense_inputs, output_layer_gathers
from harness.sharding import load_full_adapter_weights, load_full_base_weights
from harness.tasks.common import checked_table, setup
from harness.tasks.switch import switch_evidence

__all__ = ["run_gpt_switch_case"]


def run_gpt_switch_case(ctx: Any, case: GPTCase) -> RankRecord:
    """``SwitchExtras`` for the case's dense model at its layout (eval mode, seeded base and adapter weights)."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    model = build_gpt(case.shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype,
                      parallel_output=not output_layer_gathers(case.contract))
    load_full_base_weights(model, case.seed, tp_rank, tp)
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s = case.shape.seq_length
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)
    forward = lambda m: m(ids, pos, causal_mask(s).to(device), decoder_input=x)  # noqa: E731
    model.eval()
    with torch.no_grad():
        base = forward(model).detach().to(device="cpu", dtype=torch.float64)
    lora_kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**lora_kwargs)
    model = peft(model, training=case.training)
    _, broken = checked_table(
        lambda: load_full_adapter_weights(model, case.seed, tp_rank, tp, lora_kwargs.get("dim", 32)), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    model.eval()
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=switch_evidence(peft, model, forward, base),
    )
