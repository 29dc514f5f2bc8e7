"""Rank tasks for tests/megatron/test_gpu_paths.py: Transformer Engine layers adapted by lora.megatron.

They run in an NCCL rank pool (one CUDA device per rank), so they live in an
importable module and are top-level ``fn(ctx, ...)``. Nothing here is
imported on a CPU-only machine: the tests skip before any pool starts.

Each task builds a megatron-core Transformer Engine layer at TP = the
pool's world size (megatron-core 0.19.2's ``megatron.core.extensions.
transformer_engine``), loads each rank's shard of seeded full weights,
applies ``lora.megatron``, sets the adapters to slices of seeded full
matrices (``harness.sharding.load_full_adapter_weights``, SPEC's table),
runs forward, gathers the output and returns it with the reference's
output: ``lora.reference`` on a plain ``torch.nn`` layer holding the same
full weights and the same full adapters, on the same rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.layouts import ParallelLayout
from harness.sharding import load_full_adapter_weights, seeded_tensor

IN, OUT, DIM, ALPHA, TOKENS = 32, 48, 8, 16, 12


class _Holder(nn.Module):
    """``norm`` (optional) then ``proj``: the module path ``proj`` is what LoRA targets on both sides."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        out = self.proj(x)
        return out[0] if isinstance(out, tuple) else out


def _setup(ctx: Any, seed: int) -> tuple[int, int, Any]:
    from megatron.core import parallel_state

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ParallelLayout(tp=ctx.world_size).initialize_megatron(ctx.world_size, seed=seed)
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def _config(tp: int) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=IN,
        num_attention_heads=tp,
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
    )


def _gather_last(t: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def device_and_all_reduce(ctx: Any) -> dict[str, Any]:
    """Which device this rank computes on, and an NCCL all-reduce of one 1/world_size per rank."""
    t = torch.full((1,), 1.0 / ctx.world_size, device=ctx.device)
    torch.distributed.all_reduce(t)
    return {"device": str(ctx.device), "sum": round(t.item(), 6)}


def te_linear_forward(ctx: Any, kind: str, seed: int) -> dict[str, Any]:
    """``kind``: column, row or layernorm_column. Output of lora.megatron on the TE layer and of the reference."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    import lora.megatron
    import lora.reference

    tp_rank, tp, group = _setup(ctx, seed)
    device = ctx.device
    cfg = _config(tp)
    common = dict(config=cfg, init_method=nn.init.zeros_, bias=False, skip_bias_add=False, is_expert=False, tp_group=group)
    if kind == "column":
        base = TEColumnParallelLinear(IN, OUT, gather_output=False, **common)
    elif kind == "layernorm_column":
        base = TELayerNormColumnParallelLinear(IN, OUT, gather_output=False, **common)
    elif kind == "row":
        base = TERowParallelLinear(IN, OUT, input_is_parallel=True, **{k: v for k, v in common.items()})
    else:
        raise ValueError(kind)
    full_w = seeded_tensor(seed, "proj.weight", (OUT, IN), std=IN ** -0.5)
    with torch.no_grad():
        if kind == "row":
            base.weight.copy_(torch.chunk(full_w, tp, dim=1)[tp_rank])
        else:
            base.weight.copy_(torch.chunk(full_w, tp, dim=0)[tp_rank])
    model = _Holder(base).to(device)
    model = lora.megatron.LoRA(target_modules=["proj"], dim=DIM, alpha=ALPHA)(model)
    load_full_adapter_weights(model, seed, tp_rank, tp, DIM)

    x = seeded_tensor(seed, "x", (TOKENS, 1, IN)).to(device)
    x_in = torch.chunk(x, tp, dim=-1)[tp_rank] if kind == "row" else x
    with torch.no_grad():
        out = model(x_in)
    out = out if kind == "row" else _gather_last(out, group, tp)

    ref_norm = nn.LayerNorm(IN, eps=1e-5) if kind == "layernorm_column" else None
    ref_lin = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        ref_lin.weight.copy_(full_w)
    ref = _Holder(ref_lin, ref_norm).to(device)
    ref = lora.reference.LoRA(target_modules=["proj"], dim=DIM, alpha=ALPHA)(ref)
    load_full_adapter_weights(ref, seed, 0, 1, DIM)
    with torch.no_grad():
        expected = ref(x)
    return {"out": out.float().cpu(), "expected": expected.float().cpu(), "base_type": type(base).__name__}


def _te_grouped_mlp(cfg: Any, experts: int, fc1_full: list, fc2_full: list, device: Any) -> nn.Module:
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    mlp = TEGroupedMLP(
        experts,
        cfg,
        GroupedMLPSubmodules(linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    with torch.no_grad():
        for i in range(experts):
            getattr(mlp.linear_fc1, f"weight{i}").copy_(fc1_full[i])
            getattr(mlp.linear_fc2, f"weight{i}").copy_(fc2_full[i])
    holder = nn.Module()
    holder.mlp = nn.Module()
    holder.mlp.experts = mlp.to(device)
    return holder


def te_grouped_experts_forward(ctx: Any, seed: int, share_expert_adapters: bool) -> dict[str, Any]:
    """megatron's TEGroupedMLP on TE's grouped linears (world size 1): lora.megatron's output and lora.reference's.

    Two TEGroupedMLPs with the same seeded expert weights; each LoRA draws
    its adapters from ``torch.manual_seed(seed)`` (B from "normal", so the
    adapters contribute): lora.megatron draws the full matrices in the
    reference's order, so both hold the same adapters (returned for the
    test to check), and the outputs must agree. Expert 1 gets no tokens.
    """
    import lora.megatron
    import lora.reference

    experts, ffn = 4, 16
    _setup(ctx, seed)
    device = ctx.device
    cfg = _config(1)
    cfg.num_moe_experts = experts
    cfg.moe_ffn_hidden_size = ffn
    cfg.moe_grouped_gemm = True
    cfg.moe_router_topk = 1
    cfg.gated_linear_unit = False
    cfg.activation_func = torch.nn.functional.gelu
    fc1_full = [seeded_tensor(seed, f"fc1.{i}", (ffn, IN), std=IN ** -0.5) for i in range(experts)]
    fc2_full = [seeded_tensor(seed, f"fc2.{i}", (IN, ffn), std=ffn ** -0.5) for i in range(experts)]
    kw = dict(target_modules=["*.experts.linear_fc1", "*.experts.linear_fc2"], dim=DIM, alpha=ALPHA,
              lora_B_init_method="normal", share_expert_adapters=share_expert_adapters)
    outs, adapters = {}, {}
    tokens = [3, 0, 5, 4]
    x = seeded_tensor(seed, "x", (sum(tokens), IN)).to(device)
    probs = torch.ones(sum(tokens), device=device)
    for name, impl in (("impl", lora.megatron), ("reference", lora.reference)):
        holder = _te_grouped_mlp(cfg, experts, fc1_full, fc2_full, device)
        torch.manual_seed(seed)
        holder = impl.LoRA(**kw)(holder)
        adapters[name] = {n: p.detach().float().cpu() for n, p in holder.named_parameters() if ".adapter." in n}
        with torch.no_grad():
            out, _ = holder.mlp.experts(x, torch.tensor(tokens), probs)
        outs[name] = out.float().cpu()
    return {"out": outs["impl"], "expected": outs["reference"], "adapters": adapters,
            "experts_type": type(holder.mlp.experts).__name__}
