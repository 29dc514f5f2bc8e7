"""The MoE recompute task: the case's MoE GPTModel trained one forward and backward without and with each recompute setting."""

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
from harness.tasks.common import checked_table, cpu64
from harness.tasks.recompute import BrokenTable, adapter_gradients, probe_backward, recompute_evidence

__all__ = ["run_moe_recompute_case"]


def run_moe_recompute_case(ctx: Any, case: MoECase) -> RankRecord:
    """``RecomputeExtras`` for the case's MoE model at its layout (training, whatever the case's mode)."""
    from megatron.core import parallel_state as ps

    layout = case.layout
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    sizes: dict[str, int] = {}

    # Every model stays alive until the task ends: no two runs of one example share an id()
    # (an implementation that remembers models by id() is judged on the models, not the allocator).
    alive: list[Any] = []

    def run(overrides: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        impl, got, model = base_model(ctx, case, **overrides)
        sizes.update(got)
        tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
        full_x = seeded_tensor(case.seed, "input", (s, b, h)).to(case.model_dtype)
        x = full_x.chunk(tp, dim=0)[tp_rank] if layout.sp else full_x
        cpu.manual_seed(case.seed)
        model = impl.LoRA(**case.lora_kwargs())(model, training=True)
        table, broken = checked_table(lambda: moe_adapter_table(model, case, sizes), ctx.rank, tp_rank, tp)
        if broken is not None:
            raise BrokenTable(broken)
        load_seeded_adapters(model, table, case, sizes)
        out = model(ids, pos, causal_mask(s), decoder_input=x)
        probe = seeded_tensor(case.seed, "probe", tuple(out.shape)).to(dtype=out.dtype)
        probe_backward(out, probe)
        alive.append(model)
        return cpu64(out), adapter_gradients(model)

    try:
        extras = recompute_evidence("moe", run, case)
    except BrokenTable as exc:
        return exc.record
    return RankRecord(
        rank=ctx.rank, tp_rank=sizes.get("tp_rank", 0), tp_size=sizes.get("tp_size", 1), dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=extras,
    )
