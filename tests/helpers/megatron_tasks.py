"""Rank tasks for tests/megatron/test_cpu_compat.py and tests/lora/test_megatron_lora.py.

They run inside rank-pool processes (``harness.pool``), so they live in an
importable module and are top-level functions ``fn(ctx, ...)``. Each builds
real megatron-core layers for the TP size of its pool, runs them, and returns
plain tensors (and, for expected failures, the exception's type, message and
the file it came from) for the parent test to compare.
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import torch
from torch import nn

from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape, build_gpt, causal_mask, transformer_config
from harness.sharding import base_partition, load_full_base_weights, seeded_tensor

HIDDEN = 8
OUT = 12


def _init(ctx: Any, seed: int) -> tuple[int, int]:
    from megatron.core import parallel_state

    ParallelLayout(tp=ctx.world_size).initialize_megatron(ctx.world_size, seed=seed)
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _error(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "files": [f.filename for f in frames],
    }


# --------------------------------------------------------------------- RNG


def dropout_mask(n: int = 256, p: float = 0.5) -> torch.Tensor:
    """Which of n units a dropout with probability p keeps, drawn from the current default stream."""
    return torch.nn.functional.dropout(torch.ones(n), p, training=True) != 0


def rng_streams(ctx: Any, seed: int) -> dict[str, Any]:
    """Dropout masks from the model-parallel fork, the data-parallel fork and the default stream."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from harness.cpu import is_active

    tp_rank, tp = _init(ctx, seed)
    default = dropout_mask()
    _init(ctx, seed)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        mp = dropout_mask()
    with tracker.fork("data-parallel-rng"):
        dp = dropout_mask()
    default_after = dropout_mask()
    return {
        "active": is_active(),
        "tp_rank": tp_rank,
        "tp": tp,
        "default": default,
        "mp": mp,
        "dp": dp,
        "default_after": default_after,
    }


# ----------------------------------------------------- megatron-core layers


def _build_layer(kind: str, tp: int) -> tuple[nn.Module, Any]:
    """A megatron-core module and a function running it on an (s, b, h) input."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    shape = GPTShape(num_layers=1 if kind == "layer" else 2)
    group = parallel_state.get_tensor_model_parallel_group()
    if kind in ("column", "row"):
        cfg = transformer_config(shape, tp=tp)
        if kind == "column":
            mod = ColumnParallelLinear(
                HIDDEN, OUT, config=cfg, init_method=nn.init.zeros_, bias=True, gather_output=True, tp_group=group
            )
        else:
            mod = RowParallelLinear(
                OUT, HIDDEN, config=cfg, init_method=nn.init.zeros_, bias=True, input_is_parallel=False,
                skip_bias_add=False, tp_group=group,
            )
        return mod, lambda m, x: m(x)[0]
    if kind == "layer":
        cfg = transformer_config(shape, tp=tp)
        mod = build_module(get_gpt_layer_local_spec(normalization="RMSNorm"), config=cfg, layer_number=1)
        mask = causal_mask(shape.seq_length)
        return mod, lambda m, x: m(x, attention_mask=mask)[0]
    if kind == "gpt":
        mod = build_gpt(shape, tp=tp)
        s, b = shape.seq_length, shape.micro_batch_size
        ids = torch.zeros(b, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = causal_mask(s)
        return mod, lambda m, x: m(ids, pos, mask, decoder_input=x)
    raise ValueError(kind)


def _input_shape(kind: str) -> tuple[int, ...]:
    shape = GPTShape()
    if kind == "column":
        return (3, 2, HIDDEN)
    if kind == "row":
        return (3, 2, OUT)
    return (shape.seq_length, shape.micro_batch_size, shape.hidden_size)


def megatron_forward_backward(ctx: Any, kind: str, seed: int) -> dict[str, Any]:
    """Forward+backward of one megatron-core module with seeded full weights at the pool's TP."""
    tp_rank, tp = _init(ctx, seed)
    model, run = _build_layer(kind, tp)
    load_full_base_weights(model, seed, tp_rank, tp)
    x = seeded_tensor(seed, "x", _input_shape(kind)).requires_grad_(True)
    out = run(model, x)
    probe = seeded_tensor(seed, "probe", tuple(out.shape))
    (out * probe).sum().backward()
    grads, parts, weights = {}, {}, {}
    for name, p in model.named_parameters():
        # The GPT's word embedding gets no gradient: the input is decoder_input.
        grads[name] = None if p.grad is None else p.grad.detach().clone()
        weights[name] = p.detach().clone()
        parts[name] = base_partition(model, name, p)
    return {
        "tp_rank": tp_rank,
        "tp": tp,
        "x": x.detach(),
        "output": out.detach(),
        "input_grad": x.grad.detach(),
        "grads": grads,
        "weights": weights,
        "parts": parts,
    }


def gather_without_compat(ctx: Any, seed: int) -> dict[str, Any]:
    """A TP column linear's gathered forward with the CPU layer off: the error it raises."""
    from harness import cpu

    tp_rank, tp = _init(ctx, seed)
    model, run = _build_layer("column", tp)
    load_full_base_weights(model, seed, tp_rank, tp)
    x = seeded_tensor(seed, "x", _input_shape("column"))
    result: dict[str, Any] = {"was_active": cpu.is_active()}
    cpu.deactivate()
    try:
        result["active_during"] = cpu.is_active()
        run(model, x)
        result["error"] = None
    except Exception as exc:  # noqa: BLE001 - the error is the result
        result["error"] = _error(exc)
    finally:
        cpu.activate()
    result["active_after"] = cpu.is_active()
    # Back in CPU mode the very same layer runs.
    result["output_after"] = run(model, x).detach()
    return result


# ----------------------------------------------------------------- LoRA


def _gpt(ctx: Any, seed: int, **shape_kw: Any) -> tuple[nn.Module, int, int, GPTShape]:
    tp_rank, tp = _init(ctx, seed)
    shape = GPTShape(**shape_kw)
    model = build_gpt(shape, tp=tp)
    load_full_base_weights(model, seed, tp_rank, tp)
    return model, tp_rank, tp, shape


def _run_gpt(model: nn.Module, shape: GPTShape, seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    s, b = shape.seq_length, shape.micro_batch_size
    x = seeded_tensor(seed, "input", (s, b, shape.hidden_size)).requires_grad_(requires_grad)
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return model(ids, pos, causal_mask(s), decoder_input=x), x


def _apply_lora(model: nn.Module, seed: int, lora_kw: dict[str, Any], training: bool = True) -> tuple[nn.Module, list[str]]:
    from lora.megatron import LoRA

    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LoRA(**lora_kw)(model, training=training)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "LoRA" in str(w.message)]
    return model, msgs


def lora_parameters(
    ctx: Any, seed: int, lora_kw: dict[str, Any], shape_kw: dict[str, Any], training: bool = True
) -> dict[str, Any]:
    """Apply lora.megatron.LoRA to a GPT at the pool's TP; every parameter's value, dtype and requires_grad."""
    from lora.megatron.dense_adapters import ParallelLoRALinear

    model, tp_rank, tp, shape = _gpt(ctx, seed, **shape_kw)
    model, msgs = _apply_lora(model, seed, lora_kw, training)
    params = {
        name: {"value": p.detach().clone(), "dtype": p.dtype, "requires_grad": p.requires_grad}
        for name, p in model.named_parameters()
    }
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, ParallelLoRALinear))
    return {
        "tp_rank": tp_rank,
        "tp": tp,
        "params": params,
        "wrapped": wrapped,
        "warnings": msgs,
        "training": model.training,
        "any_module_training": any(m.training for m in model.modules()),
    }


def lora_error(ctx: Any, seed: int, lora_kw: dict[str, Any], shape_kw: dict[str, Any]) -> dict[str, Any]:
    """Apply LoRA and return the exception it raises (None if it raises none)."""
    model, *_ = _gpt(ctx, seed, **shape_kw)
    try:
        _apply_lora(model, seed, lora_kw)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return _error(exc)
    return None


def lora_idempotence(ctx: Any, seed: int, lora_kw: dict[str, Any]) -> dict[str, Any]:
    """Parameters after applying LoRA once, and after applying it again (same and fresh config object)."""
    from lora.megatron import LoRA

    model, *_ = _gpt(ctx, seed)
    lora = LoRA(**lora_kw)
    torch.manual_seed(seed)
    model = lora(model)
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    once_ids = {n: id(p) for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lora(model)
        model = LoRA(**lora_kw)(model)
    twice = {n: p.detach().clone() for n, p in model.named_parameters()}
    twice_ids = {n: id(p) for n, p in model.named_parameters()}
    return {
        "once": once,
        "twice": twice,
        "same_objects": once_ids == twice_ids,
        "warnings": [str(w.message) for w in caught if "LoRA" in str(w.message)],
    }


def lora_dtype_forward(ctx: Any, seed: int) -> dict[str, Any]:
    """lora_dtype=bfloat16: adapter dtypes, each wrapper's output dtype and its delta vs a float64 recomputation."""
    from lora.megatron.dense_adapters import ParallelLoRALinear

    model, tp_rank, tp, shape = _gpt(ctx, seed)
    model, _ = _apply_lora(model, seed, dict(dim=4, alpha=8, lora_dtype=torch.bfloat16, lora_B_init_method="normal"))
    model.eval()
    outs: dict[str, Any] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, ParallelLoRALinear):
            def hook(m, args, out, name=name):
                base = m.to_wrap(args[0])[0]
                outs[name] = {"out_dtype": out[0].dtype, "delta": (out[0] - base).detach(), "x": args[0].detach()}
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        logits, _ = _run_gpt(model, shape, seed)
    for h in hooks:
        h.remove()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    return {"tp_rank": tp_rank, "tp": tp, "logits_dtype": logits.dtype, "dtypes": dtypes, "outs": outs, "weights": weights}


def lora_dropout(ctx: Any, seed: int) -> dict[str, Any]:
    """dropout=0.5: eval outputs (twice), eval with dropout set to 0, and two train-mode outputs."""
    model, tp_rank, tp, shape = _gpt(ctx, seed)
    model, _ = _apply_lora(model, seed, dict(dim=4, alpha=8, dropout=0.5, lora_B_init_method="normal"))
    from lora.megatron.dense_adapters import ParallelLoRALinear

    with torch.no_grad():
        model.eval()
        eval1, _ = _run_gpt(model, shape, seed)
        eval2, _ = _run_gpt(model, shape, seed)
        model.train()
        train1, _ = _run_gpt(model, shape, seed)
        train2, _ = _run_gpt(model, shape, seed)
        for m in model.modules():
            if isinstance(m, ParallelLoRALinear):
                m.adapter.dropout = 0.0
        model.eval()
        no_dropout, _ = _run_gpt(model, shape, seed)
    return {"eval1": eval1, "eval2": eval2, "train1": train1, "train2": train2, "no_dropout": no_dropout}


def lora_merge_shards(ctx: Any, seed: int, out_f: int, in_f: int, r: int, alpha: float) -> dict[str, Any]:
    """LoRAMerge().merge on column and row shards of seeded full matrices."""
    from megatron.core import parallel_state

    from lora.megatron import LoRAMerge

    tp_rank, tp = _init(ctx, seed)
    group = parallel_state.get_tensor_model_parallel_group()
    base = seeded_tensor(seed, "W", (out_f, in_f))
    a = seeded_tensor(seed, "A", (r, in_f))
    b = seeded_tensor(seed, "B", (out_f, r))
    rows = lambda t: torch.chunk(t, tp, dim=0)[tp_rank]  # noqa: E731
    cols = lambda t: torch.chunk(t, tp, dim=1)[tp_rank]  # noqa: E731
    merge = LoRAMerge()
    column = merge.merge(rows(base), rows(b), rows(a), alpha, r, tp_size=tp, tp_group=group)
    row = merge.merge(cols(base), rows(b), cols(a), alpha, r, tp_size=tp, tp_group=group)
    bf16 = merge.merge(rows(base).bfloat16(), rows(b), rows(a), alpha, r, tp_size=tp, tp_group=group)
    return {"tp_rank": tp_rank, "tp": tp, "column": column, "row": row, "bf16": bf16}


def lora_merge_model(ctx: Any, seed: int, lora_kw: dict[str, Any]) -> dict[str, Any]:
    """Adapted eval logits, then merge_lora: the merged model's logits and its module types."""
    from lora.megatron.wrapper import is_adapter_wrapper
    from lora.megatron import merge_lora

    model, tp_rank, tp, shape = _gpt(ctx, seed)
    model.eval()
    with torch.no_grad():
        base, _ = _run_gpt(model, shape, seed)
    model, _ = _apply_lora(model, seed, lora_kw)
    model.eval()
    with torch.no_grad():
        adapted, _ = _run_gpt(model, shape, seed)
        merged_model = merge_lora(model)
        merged, _ = _run_gpt(merged_model, shape, seed)
    names = [n for n, _ in merged_model.named_parameters()]
    return {
        "tp_rank": tp_rank,
        "base": base,
        "adapted": adapted,
        "merged": merged,
        "wrappers_left": [n for n, m in merged_model.named_modules() if is_adapter_wrapper(m)],
        "types": {n: type(m).__name__ for n, m in merged_model.named_modules() if n.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"))},
        "param_names": names,
    }


def lora_row_input_not_parallel(ctx: Any, seed: int) -> dict[str, Any]:
    """A RowParallelLinear that scatters its own input (input_is_parallel=False), adapted at the pool's TP."""
    from lora.megatron import LoRA

    tp_rank, tp = _init(ctx, seed)
    base, run = _build_layer("row", tp)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear_proj = base

    holder = Holder()
    load_full_base_weights(holder, seed, tp_rank, tp)
    torch.manual_seed(seed)
    try:
        LoRA(target_modules=["linear_proj"], dim=4, alpha=8, lora_B_init_method="normal")(holder)
        x = seeded_tensor(seed, "x", _input_shape("row"))
        out = run(holder.linear_proj, x).detach()
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return {"error": _error(exc)}
    adapter = holder.linear_proj.adapter
    return {
        "error": None,
        "tp_rank": tp_rank,
        "x": x,
        "out": out,
        "W": holder.linear_proj.to_wrap.weight.detach().clone(),
        "bias": holder.linear_proj.to_wrap.bias.detach().clone(),
        "A": adapter.linear_in.weight.detach().clone(),
        "B": adapter.linear_out.weight.detach().clone(),
    }


# ---------------------------------------------------- sequence parallelism


def _seq_shard(full: torch.Tensor, tp_rank: int, tp: int, sequence_parallel: bool) -> torch.Tensor:
    """This rank's part of an (s, b, h) activation: its sequence shard under SP, else all of it."""
    if not sequence_parallel or tp == 1:
        return full
    return torch.chunk(full, tp, dim=0)[tp_rank]


def sp_norm(ctx: Any, seed: int, normalization: str, s: int = 6, b: int = 2, h: int = 8) -> dict[str, Any]:
    """A SequenceParallelNorm (float64) on this rank's sequence shard of a seeded input: output, input and weight grads."""
    from harness.families.gpt.model import SequenceParallelNorm

    tp_rank, tp = _init(ctx, seed)
    cfg = transformer_config(
        GPTShape(), tp=max(tp, 2), sequence_parallel=True, params_dtype=torch.float64, normalization=normalization
    )
    norm = SequenceParallelNorm(config=cfg, hidden_size=h, eps=1e-5).double()
    full = {n: seeded_tensor(seed, f"norm.{n}", tuple(p.shape), std=0.1, mean=1.0 if n == "weight" else 0.0).double()
            for n, p in norm.named_parameters()}
    with torch.no_grad():
        for n, p in norm.named_parameters():
            p.copy_(full[n])
    x_full = seeded_tensor(seed, "x", (s, b, h)).double()
    probe_full = seeded_tensor(seed, "probe", (s, b, h)).double()
    x = _seq_shard(x_full, tp_rank, tp, True).clone().requires_grad_(True)
    out = norm(x)
    (out * _seq_shard(probe_full, tp_rank, tp, True)).sum().backward()
    return {
        "tp_rank": tp_rank,
        "tp": tp,
        "type": type(norm).__name__,
        "x_full": x_full,
        "probe_full": probe_full,
        "weights": full,
        "output": out.detach(),
        "input_grad": x.grad.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in norm.named_parameters()},
        "sp_flags": {n: getattr(p, "sequence_parallel", None) for n, p in norm.named_parameters()},
    }


def _break_sp_adapter(how: str):
    """Replace one sequence-parallel step of lora.megatron's adapter by a wrong one; returns an undo function.

    "no_scatter": a row adapter's full (s, b, out) output is not split to the
    sequence shard; "reduce_scatter": it is reduce-scattered instead of split
    (t times the delta); "gather_split_grad": a column adapter's input gather
    splits its gradient instead of reduce-scattering it (forward right,
    A's partial input gradients never summed over the r/t shards).
    """
    from megatron.core.tensor_parallel import mappings

    from lora.megatron.dense_adapters import ParallelLinearAdapter

    if how == "no_scatter":
        attr = "_to_sequence_shard"

        def broken(self, out):
            return out
    elif how == "reduce_scatter":
        attr = "_to_sequence_shard"

        def broken(self, out):
            return mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
    elif how == "gather_split_grad":
        attr = "_gather_sequence"

        def broken(self, x):
            return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.tp_group)
    else:
        raise ValueError(how)
    original = getattr(ParallelLinearAdapter, attr)
    setattr(ParallelLinearAdapter, attr, broken)

    def undo() -> None:
        setattr(ParallelLinearAdapter, attr, original)

    return undo


def gpt_sp_forward_backward(
    ctx: Any,
    seed: int,
    sequence_parallel: bool,
    lora_kw: Any = None,
    shape_kw: Any = None,
    break_adapter: Any = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """A GPT (optionally with lora.megatron on it) at the pool's TP, with or without SP; forward+backward on seeded full weights.

    float64 by default, so that TP=1 and TP=2 agree to ~1e-12 and any
    layout error stands far above the rounding. ``break_adapter`` names a
    wrong SP step to patch in for this run (``_break_sp_adapter``).

    Under SP the decoder input handed to the model is this rank's sequence
    shard (megatron does not scatter a given decoder_input), so the input
    gradient returned is that shard's. Logits are the full (b, s, vocab) on
    every rank (the output layer gathers the sequence, then the vocab).
    """
    from harness.families.gpt.model import sequence_parallel_params
    from harness.sharding import load_full_adapter_weights

    tp_rank, tp = _init(ctx, seed)
    shape = GPTShape(**(shape_kw or {}))
    # The torch norms ignore params_dtype (as megatron's WrappedTorchNorm does): cast them too.
    model = build_gpt(shape, tp=tp, sequence_parallel=sequence_parallel, params_dtype=dtype).to(dtype)
    load_full_base_weights(model, seed, tp_rank, tp)
    layout = None
    undo = None
    try:
        if lora_kw is not None:
            model, _ = _apply_lora(model, seed, lora_kw)
            layout = load_full_adapter_weights(model, seed, tp_rank, tp, lora_kw["dim"])
        if break_adapter:
            undo = _break_sp_adapter(break_adapter)
        s, b = shape.seq_length, shape.micro_batch_size
        x_full = seeded_tensor(seed, "input", (s, b, shape.hidden_size)).to(dtype)
        x = _seq_shard(x_full, tp_rank, tp, sequence_parallel).clone().requires_grad_(True)
        ids = torch.zeros(b, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        try:
            logits = model(ids, pos, causal_mask(s), decoder_input=x)
            probe = seeded_tensor(seed, "probe", tuple(logits.shape)).to(logits.dtype)
            (logits * probe).sum().backward()
        except Exception as exc:  # noqa: BLE001 - the error is the result
            return {"tp_rank": tp_rank, "tp": tp, "error": _error(exc)}
    finally:
        if undo is not None:
            undo()
    grads, parts = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grads[name] = None if p.grad is None else p.grad.detach().clone()
        if ".adapter." not in name:
            parts[name] = base_partition(model, name, p)
    return {
        "tp_rank": tp_rank,
        "tp": tp,
        "error": None,
        "logits": logits.detach(),
        "local_input_shape": tuple(x.shape),
        "input_grad": x.grad.detach(),
        "grads": grads,
        "parts": parts,
        "adapter_layout": layout,
        "sp_params": sequence_parallel_params(model),
        "norm_types": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm"))}),
    }


def gpt_sp_dropout(ctx: Any, seed: int, lora_kw: Any) -> dict[str, Any]:
    """lora.megatron with dropout on an SP GPT at the pool's TP: eval logits, eval with dropout 0, two train logits."""
    from lora.megatron.dense_adapters import ParallelLoRALinear

    tp_rank, tp = _init(ctx, seed)
    shape = GPTShape()
    model = build_gpt(shape, tp=tp, sequence_parallel=tp > 1)
    load_full_base_weights(model, seed, tp_rank, tp)
    model, _ = _apply_lora(model, seed, lora_kw)
    s, b = shape.seq_length, shape.micro_batch_size
    x = _seq_shard(seeded_tensor(seed, "input", (s, b, shape.hidden_size)), tp_rank, tp, tp > 1)
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)

    def run() -> torch.Tensor:
        return model(ids, pos, causal_mask(s), decoder_input=x).detach()

    with torch.no_grad():
        model.eval()
        eval1 = run()
        model.train()
        train1, train2 = run(), run()
        for m in model.modules():
            if isinstance(m, ParallelLoRALinear):
                m.adapter.dropout = 0.0
        model.eval()
        no_dropout = run()
    return {"tp_rank": tp_rank, "eval1": eval1, "train1": train1, "train2": train2, "no_dropout": no_dropout}


def gloo_copies_aliased(ctx: Any) -> dict[str, Any]:
    """harness.megatron_state.gloo_groups_as_built on a dense DP=2 world: megatron's optimizer-facing
    getters before, inside and after the block, and whether destroying the groups still works."""
    from megatron.core import parallel_state as ps

    from harness.layouts import ParallelLayout
    from harness.megatron_state import destroy_megatron, gloo_groups_as_built

    ParallelLayout(tp=1, ep=2).initialize_megatron(ctx.world_size, seed=0)
    out: dict[str, Any] = {}
    try:
        ps.get_data_parallel_group_gloo(with_context_parallel=True, partial_data_parallel=True)
        out["before"] = "available"
    except AssertionError:
        out["before"] = "missing"
    with gloo_groups_as_built():
        group = ps.get_data_parallel_group_gloo(with_context_parallel=True, partial_data_parallel=True)
        out["inside_size"] = torch.distributed.get_world_size(group)
        out["inside_is_group"] = group is ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
        out["expert_inside"] = ps.get_expert_data_parallel_group_gloo() is ps.get_expert_data_parallel_group()
    out["after"] = ps._DATA_PARALLEL_GROUP_WITH_CP_GLOO is None and ps._EXPERT_DATA_PARALLEL_GROUP_GLOO is None
    destroy_megatron()
    out["destroyed"] = not ps.model_parallel_is_initialized()
    return out
