"""The dense adapter switch task: the base GPTModel's logits, then the adapted model's through switching off and on."""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.evidence import RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import build_stage, causal_mask, dense_inputs
from harness.pipeline import chunks_of, global_view, handed_over, stage_input, stage_logits
from harness.sharding import load_full_adapter_weights, load_full_base_weights
from harness.tasks.common import checked_table, setup
from harness.tasks.switch import switch_evidence

__all__ = ["run_gpt_switch_case"]


def run_gpt_switch_case(ctx: Any, case: GPTCase) -> RankRecord:
    """``SwitchExtras`` for the case's dense model at its layout (eval mode, seeded base and adapter weights);
    at a pipeline layout this rank's stage, its logits through megatron's schedule (``harness.pipeline``)."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    layout = case.layout
    chunks = build_stage(case, tp)
    load_full_base_weights(global_view(chunks), case.seed, tp_rank, tp)
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s, b = case.shape.seq_length, case.shape.micro_batch_size
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)
    mask = causal_mask(s).to(device)

    def forward(m: Any) -> torch.Tensor:
        if layout.pp == 1:
            return chunks_of(m)[0](ids, pos, mask, decoder_input=x)
        return stage_logits(chunks_of(m), stage_input(ids, pos, mask), x, (b, s, case.shape.vocab_size), layout)

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        base = forward(handed_over(chunks, layout)).detach().to(device="cpu", dtype=torch.float64)
    lora_kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**lora_kwargs)
    model = peft(handed_over(chunks, layout), training=case.training)
    _, broken = checked_table(
        lambda: load_full_adapter_weights(global_view(chunks_of(model)), case.seed, tp_rank, tp, lora_kwargs.get("dim", 32), layout.pp > 1),
        ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    for chunk in chunks_of(model):
        chunk.eval()
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=switch_evidence(peft, model, forward, base, named=lambda m: global_view(chunks_of(m))),
    )
