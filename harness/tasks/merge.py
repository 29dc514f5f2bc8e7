"""Merge evidence, gathered by the forward/backward tasks once their comparisons are made.

Two checks that do not pass through the reference:

* per module, ``impl.LoRAMerge().merge(base, B, A, alpha, dim, tp_size=t,
  tp_group=g)`` on this rank's shards must return this rank's shard of
  ``W + (alpha/dim) B @ A`` computed here in float64 from the gathered
  full matrices (SPEC's LoRAMerge table);
* the model-level fold, ``impl.LoRAMerge()(model)``, must leave no adapter
  wrapper and give the same logits as the adapted model on the same input.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.sharding import Partition, adapter_modules, base_partition, shard, unshard

__all__ = ["module_merges", "fold_model", "cast_once"]


def _gather(t: torch.Tensor, part: Partition, group: Any, size: int) -> torch.Tensor:
    if part.dim is None or size == 1:
        return t.detach().double().clone()
    pieces = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(pieces, t.detach().contiguous(), group=group)
    return unshard([p.double() for p in pieces], part)


def _group_of(base: torch.nn.Module) -> tuple[Any, int, int]:
    group = getattr(base, "tp_group", None)
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def module_merges(model: torch.nn.Module, impl: Any, table: dict[str, Any], alpha: float) -> dict[str, Any]:
    """{module: (the implementation's merged shard, the expected shard)} for every dense adapted module.

    ``table`` is ``load_full_adapter_weights``' (param -> (module, partition, full shape)).
    Raises what the implementation raises.
    """
    merger = impl.LoRAMerge()
    out: dict[str, Any] = {}
    for wname, wrapper in sorted(adapter_modules(model).items()):
        base = wrapper.to_wrap
        a_name, b_name = f"{wname}.adapter.linear_in.weight", f"{wname}.adapter.linear_out.weight"
        if a_name not in table or not isinstance(getattr(base, "weight", None), torch.Tensor):
            continue
        group, size, rank = _group_of(base)
        A, B = model.get_parameter(a_name), model.get_parameter(b_name)
        dim = table[a_name][2][0]
        base_part = base_partition(model, f"{wname}.to_wrap.weight", base.weight)
        w_full = _gather(base.weight, base_part, group, size)
        a_full = _gather(A, table[a_name][1], group, size)
        b_full = _gather(B, table[b_name][1], group, size)
        want = shard(w_full + (alpha / dim) * (b_full @ a_full), base_part, rank, size)
        with torch.no_grad():
            got = merger.merge(base.weight.detach().clone(), B.detach(), A.detach(), alpha, dim, tp_size=size, tp_group=group)
        out[wname] = (got.detach().double().cpu(), want.cpu(), str(got.dtype), str(base.weight.dtype))
    return out


def fold_model(model: torch.nn.Module, impl: Any, forward: Callable[[torch.nn.Module], torch.Tensor]) -> dict[str, Any]:
    """The adapted logits, the folded model's logits, and any adapter wrapper the fold left behind.

    Both in eval mode: the fold is the adapter's deterministic map (SPEC: no dropout).
    """
    model.eval()
    with torch.no_grad():
        adapted = forward(model)
    merged = impl.LoRAMerge()(model)
    with torch.no_grad():
        folded = forward(merged)
    return {
        "adapted_output": adapted.detach().double().cpu(),
        "merged_output": folded.detach().double().cpu(),
        "merge_left": sorted(adapter_modules(merged))[:5],
    }


# 1 + 2**-8 + 2**-16 is exact in float32; cast once to bfloat16 it rounds up
# to 1 + 2**-7. Rounded twice (the delta 2**-8 + 2**-16 to bfloat16 first,
# a tie that goes to 2**-8, then 1 + 2**-8, a tie that goes to 1) it is 1.
_ONCE = 1.0 + 2.0**-7
_TWICE = 1.0


def cast_once(impl: Any, group: Any, size: int, rank: int) -> dict[str, Any]:
    """``{"column"|"row": None or what was wrong}``: SPEC's "computed in float32, cast once" on a bf16 base.

    Full matrices, with r = out = in = 2 * size and alpha = dim (scale 1):
    W = 1, A's rows 0 and 1 are 2**-8 and 2**-16, B's columns 0 and 1 are 1,
    so every entry of W + B @ A is 1 + 2**-8 + 2**-16 before the cast.
    Each rank passes its column- or row-parallel shards, as the model's
    layers hold them, with the real group.
    """
    n = 2 * size
    bf16 = torch.bfloat16
    w = torch.ones(n, n, dtype=bf16)
    a = torch.zeros(n, n, dtype=bf16)
    a[0], a[1] = 2.0**-8, 2.0**-16
    b = torch.zeros(n, n, dtype=bf16)
    b[:, 0], b[:, 1] = 1.0, 1.0
    col, row = Partition(0), Partition(1)
    layouts = {
        # base (out/t, in), A (r/t, in), B (out/t, r)
        "column": (shard(w, col, rank, size), shard(a, col, rank, size), shard(b, col, rank, size)),
        # base (out, in/t), A (r, in/t), B (out/t, r)
        "row": (shard(w, row, rank, size), shard(a, row, rank, size), shard(b, col, rank, size)),
    }
    merger = impl.LoRAMerge()
    out: dict[str, Any] = {}
    for kind, (wl, al, bl) in layouts.items():
        wl, al, bl = (t.contiguous().clone() for t in (wl, al, bl))
        with torch.no_grad():
            got = merger.merge(wl.clone(), bl, al, n, n, tp_size=size, tp_group=group if size > 1 else None)
        if got.dtype != bf16:
            out[kind] = f"returned {got.dtype} for a bfloat16 base"
        elif tuple(got.shape) != tuple(wl.shape):
            out[kind] = f"returned shape {tuple(got.shape)} for a base shard of {tuple(wl.shape)}"
        elif not bool((got == _ONCE).all()):
            vals = sorted({float(v) for v in got.float().unique()})[:4]
            twice = " (what rounding the delta to bfloat16 before the sum gives)" if vals == [_TWICE] else ""
            out[kind] = f"entries {vals}{twice}, want {_ONCE} = bfloat16(1 + 2**-8 + 2**-16)"
        else:
            out[kind] = None
    return out
