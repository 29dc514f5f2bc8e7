"""The dense recompute task: the case's GPTModel trained one forward and backward without and with each recompute setting."""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.evidence import RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import build_gpt, causal_mask, dense_inputs, output_layer_gathers
from harness.sharding import load_full_adapter_weights, load_full_base_weights, seeded_tensor
from harness.tasks.common import checked_table, cpu64, setup
from harness.tasks.recompute import BrokenTable, adapter_gradients, probe_backward, recompute_evidence

__all__ = ["run_gpt_recompute_case"]


def run_gpt_recompute_case(ctx: Any, case: GPTCase) -> RankRecord:
    """``RecomputeExtras`` for the case's dense model at its layout (training, whatever the case's mode)."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s = case.shape.seq_length
    ids, pos, x = dense_inputs(case, tp, tp_rank, device)
    lora_kwargs = case.lora_kwargs()

    # Every model stays alive until the task ends: no two runs of one example share an id()
    # (an implementation that remembers models by id() is judged on the models, not the allocator).
    alive: list[Any] = []

    def run(overrides: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        # Every run from the same RNG states (megatron's model-parallel tracker included):
        # dropout draws the same masks with and without recompute.
        case.layout.initialize_megatron(ctx.world_size, seed=case.seed)
        model = build_gpt(case.shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype,
                          parallel_output=not output_layer_gathers(case.contract), **overrides)
        load_full_base_weights(model, case.seed, tp_rank, tp)
        cpu.manual_seed(case.seed)
        model = impl.LoRA(**lora_kwargs)(model, training=True)
        _, broken = checked_table(
            lambda: load_full_adapter_weights(model, case.seed, tp_rank, tp, lora_kwargs.get("dim", 32)), ctx.rank, tp_rank, tp)
        if broken is not None:
            raise BrokenTable(broken)
        out = model(ids, pos, causal_mask(s).to(device), decoder_input=x)
        probe = seeded_tensor(case.seed, "probe", tuple(out.shape)).to(device=out.device, dtype=out.dtype)
        probe_backward(out, probe)
        alive.append(model)
        return cpu64(out), adapter_gradients(model)

    try:
        extras = recompute_evidence("gpt", run, case)
    except BrokenTable as exc:
        return exc.record
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=extras,
    )
