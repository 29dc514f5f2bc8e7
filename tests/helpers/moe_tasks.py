"""Rank tasks for tests/megatron/test_moe_cpu.py: megatron-core MoE GPTs on CPU with gloo.

Top-level functions ``fn(ctx, ...)`` run inside rank-pool processes
(``harness.pool``); each brings parallel_state into a layout, builds the
MoE GPT for it, loads the seeded full weights and returns plain tensors.
"""

from __future__ import annotations

import traceback
from typing import Any, Optional

import torch

from harness.layouts import ParallelLayout
from harness.families.gpt.model import causal_mask
from harness.families.moe.model import MoEShape, RoutingCounter, build_moe_gpt, expert_sizes, layout_sizes
from harness.sharding import base_partition, expert_param, load_full_base_weights, seeded_tensor


def _error(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc), "files": [f.filename for f in frames]}


def _seq_shard(full: torch.Tensor, tp_rank: int, tp: int, sp: bool) -> torch.Tensor:
    return torch.chunk(full, tp, dim=0)[tp_rank] if sp and tp > 1 else full


def moe_forward_backward(
    ctx: Any,
    seed: int,
    layout_name: str,
    shape_kw: dict[str, Any],
    dtype: torch.dtype = torch.float64,
    suspend: tuple = (),
    wrong_ep_offset: bool = False,
) -> dict[str, Any]:
    """An MoE GPT at ``layout_name`` on seeded full weights: logits, input grad, routing counts, grads.

    ``suspend`` names harness.cpu overrides, as (module, function) pairs, to
    run without (to show what they fix); an error is then the result.
    ``wrong_ep_offset`` loads every EP rank's experts as global experts
    0..local-1 (a placement bug the comparison must catch).
    """
    from harness import cpu

    layout = ParallelLayout.parse(layout_name)
    layout.initialize_megatron(ctx.world_size, seed=seed)
    sizes = expert_sizes()
    shape = MoEShape(**shape_kw)
    restores = [cpu.suspend_override(m, f) for m, f in suspend]
    try:
        model = build_moe_gpt(shape, **layout_sizes(layout), params_dtype=dtype).to(dtype)
        load_full_base_weights(model, seed, **(dict(sizes, ep_rank=0) if wrong_ep_offset else sizes))
        counter = RoutingCounter(model)
        s, b = shape.seq_length, shape.micro_batch_size
        tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
        x_full = seeded_tensor(seed, "input", (s, b, shape.hidden_size)).to(dtype)
        x = _seq_shard(x_full, tp_rank, tp, layout.sp).clone().requires_grad_(True)
        ids = torch.zeros(b, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        try:
            logits = model(ids, pos, causal_mask(s), decoder_input=x)
            probe = seeded_tensor(seed, "probe", tuple(logits.shape)).to(logits.dtype)
            (logits * probe).sum().backward()
        except Exception as exc:  # noqa: BLE001 - the error is the result
            return {"rank": ctx.rank, "error": _error(exc)}
    finally:
        for restore in restores:
            restore()
    grads: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        info = expert_param(name)
        part = base_partition(model, name, p)
        if info is None:
            key, kind = name, ("sp" if getattr(p, "sequence_parallel", False) else "dense")
        else:
            n_local = shape.num_experts // sizes["ep_size"]
            key, kind = info[0].format(e=sizes["ep_rank"] * n_local + info[1]), "expert"
        grads[key] = (kind, part, p.grad.detach().clone())
    return {
        "rank": ctx.rank,
        "error": None,
        **sizes,
        "logits": logits.detach(),
        "input_grad": x.grad.detach(),
        "counts": counter.counts,
        "grads": grads,
        "experts_type": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.experts")}),
        "dispatcher": sorted({type(m.token_dispatcher).__name__ for m in model.modules() if hasattr(m, "token_dispatcher")}),
    }


def grouped_linear_vs_loop(
    ctx: Any, seed: int, parallel_mode: str, splits: list[int], bias: bool, skip_bias_add: bool, etp: Optional[int] = None
) -> dict[str, Any]:
    """TorchGroupedLinear vs a per-expert loop of F.linear on the same (float64) weights: outputs and all grads."""
    from harness.families.moe.model import TorchColumnParallelGroupedLinear, TorchRowParallelGroupedLinear, moe_config

    ws = ctx.world_size
    etp = ws if etp is None else etp
    layout = ParallelLayout(tp=etp, ep=1, sp=etp > 1)
    layout.initialize_megatron(ws, seed=seed)
    shape = MoEShape(num_experts=len(splits))
    cfg = moe_config(shape, tp=etp, etp=etp, sequence_parallel=etp > 1, params_dtype=torch.float64)
    cls = TorchColumnParallelGroupedLinear if parallel_mode == "column" else TorchRowParallelGroupedLinear
    n_in, n_out = 12, 8
    lin = cls(
        len(splits), n_in, n_out, config=cfg, init_method=torch.nn.init.normal_, bias=bias,
        skip_bias_add=skip_bias_add, is_expert=True, tp_comm_buffer_name="fc1",
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(sum(splits), lin.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    out, out_bias = lin(x, splits)
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    total = (out * probe).sum()
    if out_bias is not None:
        total = total + sum((bb * (i + 1)).sum() for i, bb in enumerate(out_bias))
    total.backward()
    # The reference: a plain per-expert loop on clones of the same weights.
    ws_ = [w.detach().clone().requires_grad_(True) for w in lin.weights()]
    bs_ = [bb.detach().clone().requires_grad_(True) for bb in lin.biases()]
    xr = x.detach().clone().requires_grad_(True)
    outs, start = [], 0
    for i, n in enumerate(splits):
        y = xr[start : start + n] @ ws_[i].t()
        if bias and not skip_bias_add:
            y = y + bs_[i]
        outs.append(y)
        start += n
    ref = torch.cat(outs)
    ref_total = (ref * probe).sum()
    if bias and skip_bias_add:
        ref_total = ref_total + sum((bb * (i + 1)).sum() for i, bb in enumerate(bs_))
    ref_total.backward()
    return {
        "out": out.detach(), "ref": ref.detach(), "x_grad": x.grad, "ref_x_grad": xr.grad,
        "w_grads": [w.grad for w in lin.weights()], "ref_w_grads": [w.grad for w in ws_],
        "b_grads": [bb.grad for bb in lin.biases()], "ref_b_grads": [bb.grad for bb in bs_],
        "out_bias_is_list": isinstance(out_bias, list),
        "shapes": [tuple(w.shape) for w in lin.weights()],
        "attrs": [(w.tensor_model_parallel, w.partition_dim, w.allreduce) for w in lin.weights()],
        "names": [n for n, _ in lin.named_parameters()],
    }
