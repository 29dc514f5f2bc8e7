"""Merge evidence, gathered by the forward/backward tasks once their comparisons are made.

Two checks that do not pass through the reference:

* per module, ``impl.LoRAMerge().merge(base, B, A, alpha, dim, tp_size=t,
  tp_group=g)`` on this rank's shards must return this rank's shard of
  ``W + (alpha/dim) B @ A`` computed here in float64 from the gathered
  full matrices (SPEC's LoRAMerge table);
* the model-level fold, ``impl.LoRAMerge()(model)``, must leave no adapter
  wrapper and give the same logits as the adapted model on the same input.

Which ``merge`` the implementation offers is read off its signature
(``merge_api``), and what is there is judged:

* ``"contract"``: ``merge(base, B, A, alpha, dim, *, tp_size, tp_group)``
  (harness/SPEC.md);
* ``"group"``: ``merge(base, B, A, alpha, dim, *, tp_group, scale=None)``,
  Megatron-Bridge 0.6.2's (the TP size is the group's);
* ``"plain"``: no TP arguments (it can merge only unsharded weights: at
  TP > 1 that is one finding naming the API difference, ``MergeAPIError``).

A ``LoRAMerge`` that is not callable has no model-level fold (0.6.2's is a
tensor helper): the harness then folds the model itself with the
implementation's own ``merge``, module by module (``fold_with_merge``), and
under the strict contract the missing helper is one contract finding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from harness.evidence import ModelFold, ModuleMerge
from harness.rules.adapters import adapter_modules
from harness.sharding import Partition, base_partition, gather_full, shard
from harness.errors import MergeAPIError

__all__ = ["module_merges", "fold_model", "cast_once", "merge_api", "call_merge", "MergeAPIError", "fold_with_merge"]


def merge_api(merger: Any) -> str:
    """``"contract"``, ``"group"``, ``"plain"`` or ``"none"``: which ``merge`` signature ``merger`` offers."""
    import inspect

    fn = getattr(merger, "merge", None)
    if not callable(fn):
        return "none"
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "contract"
    if "tp_size" in names and "tp_group" in names:
        return "contract"
    if "tp_group" in names:
        return "group"
    return "plain"


def call_merge(merger: Any, base: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, dim: int, size: int, group: Any) -> torch.Tensor:
    """``merger.merge`` on this rank's shards, called the way its signature asks (``merge_api``)."""
    api = merge_api(merger)
    if api == "contract":
        return merger.merge(base, B, A, alpha, dim, tp_size=size, tp_group=group)
    if api == "group":
        return merger.merge(base, B, A, alpha, dim, tp_group=_real_group(group))
    if api == "plain":
        if size > 1:
            raise MergeAPIError(
                f"LoRAMerge.merge takes no TP arguments (merge(base, linear_out, linear_in, alpha, dim)), so it cannot "
                f"merge a shard at TP={size}; SPEC: merge(..., *, tp_size, tp_group)")
        return merger.merge(base, B, A, alpha, dim)
    raise MergeAPIError("LoRAMerge has no merge method; SPEC: LoRAMerge().merge(base, linear_out, linear_in, alpha, dim, *, tp_size, tp_group)")


def _real_group(group: Any) -> Any:
    """The TP process group itself (Megatron-Bridge's merge reads the size off it: None would mean the world)."""
    if group is not None or not dist.is_initialized():
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def fold_with_merge(model: torch.nn.Module, merger: Any, alpha: float) -> torch.nn.Module:
    """The model with every adapter folded by the implementation's own ``merge``, wrappers replaced by their bases.

    For implementations whose ``LoRAMerge`` is a tensor helper only. Dense
    adapters (``.adapter.linear_in/linear_out``) only; anything else raises
    ``MergeAPIError`` naming it.
    """
    for wname, wrapper in sorted(adapter_modules(model).items(), key=lambda kv: -kv[0].count(".")):
        base, adapter = wrapper.to_wrap, wrapper.adapter
        a_lin, b_lin = getattr(adapter, "linear_in", None), getattr(adapter, "linear_out", None)
        if not isinstance(getattr(a_lin, "weight", None), torch.Tensor) or not isinstance(getattr(base, "weight", None), torch.Tensor):
            raise MergeAPIError(f"{wname}: the harness folds dense adapters with LoRAMerge.merge only; this one has no "
                                "adapter.linear_in/linear_out weight and the implementation offers no model-level fold")
        A, B = a_lin.weight, b_lin.weight
        dim = B.shape[1]  # B is (out/t, r) for column and row bases alike
        group, size, _ = _group_of(base)
        with torch.no_grad():
            merged = call_merge(merger, base.weight.detach().clone(), B.detach(), A.detach(),
                                getattr(adapter, "alpha", alpha), dim, size, group)
            base.weight.copy_(merged.to(base.weight.dtype))
        parent_name, _, leaf = wname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, base)
    return model


def _group_of(base: torch.nn.Module) -> tuple[Any, int, int]:
    group = getattr(base, "tp_group", None)
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def module_merges(model: torch.nn.Module, impl: Any, table: dict[str, Any], alpha: float) -> dict[str, ModuleMerge]:
    """{module: (the implementation's merged shard, the expected shard, their dtypes)} for every dense adapted module.

    ``table`` is ``load_full_adapter_weights``' (param -> (module, partition, full shape)).
    Raises what the implementation raises.
    """
    merger = impl.LoRAMerge()
    modules = []  # (name, base, A, B, dim, the three partitions, group, size, rank)
    for wname, wrapper in sorted(adapter_modules(model).items()):
        base = wrapper.to_wrap
        a_name, b_name = f"{wname}.adapter.linear_in.weight", f"{wname}.adapter.linear_out.weight"
        if a_name not in table or not isinstance(getattr(base, "weight", None), torch.Tensor):
            continue
        parts = (base_partition(model, f"{wname}.to_wrap.weight", base.weight), table[a_name][1], table[b_name][1])
        modules.append((wname, base, model.get_parameter(a_name), model.get_parameter(b_name), table[a_name][2][0], parts,
                        *_group_of(base)))
    # The full W, A and B of every module, one all_gather per TP group (every
    # rank walks the same modules in the same order).
    by_group: dict[int, list[Any]] = {}
    for m in modules:
        by_group.setdefault(id(m[6]), []).append(m)
    fulls: dict[str, list[torch.Tensor]] = {}
    for members in by_group.values():
        group, size = members[0][6], members[0][7]
        gathered = gather_full([t for _, base, A, B, *_ in members for t in (base.weight, A, B)],
                               [part for m in members for part in m[5]], group, size)
        for k, m in enumerate(members):
            fulls[m[0]] = gathered[3 * k:3 * k + 3]
    out: dict[str, ModuleMerge] = {}
    for wname, base, A, B, dim, parts, group, size, rank in modules:
        w_full, a_full, b_full = fulls[wname]
        want = shard(w_full + (alpha / dim) * (b_full @ a_full), parts[0], rank, size)
        with torch.no_grad():
            got = call_merge(merger, base.weight.detach().clone(), B.detach(), A.detach(), alpha, dim, size, group)
        out[wname] = ModuleMerge(got.detach().double().cpu(), want.cpu(), str(got.dtype), str(base.weight.dtype))
    return out


def fold_model(model: torch.nn.Module, impl: Any, forward: Callable[[torch.nn.Module], torch.Tensor], alpha: float = 32) -> ModelFold:
    """The adapted logits, the folded model's logits, and any adapter wrapper the fold left behind.

    Both in eval mode: the fold is the adapter's deterministic map (SPEC: no dropout).
    ``how``: ``"model"`` when the implementation folded the model
    itself, ``"harness"`` when its LoRAMerge is not callable and the harness
    folded it with the implementation's own ``merge``.
    """
    model.eval()
    with torch.no_grad():
        adapted = forward(model)
    merger = impl.LoRAMerge()
    how = "model" if callable(merger) else "harness"
    merged = merger(model) if how == "model" else fold_with_merge(model, merger, alpha)
    with torch.no_grad():
        folded = forward(merged)
    return ModelFold(
        adapted_output=adapted.detach().double().cpu(),
        merged_output=folded.detach().double().cpu(),
        left=sorted(adapter_modules(merged))[:5],
        how=how,
    )


# 1 + 2**-8 + 2**-16 is exact in float32; cast once to bfloat16 it rounds up
# to 1 + 2**-7. Rounded twice (the delta 2**-8 + 2**-16 to bfloat16 first,
# a tie that goes to 2**-8, then 1 + 2**-8, a tie that goes to 1) it is 1.
_ONCE = 1.0 + 2.0**-7
_TWICE = 1.0


def cast_once(impl: Any, group: Any, size: int, rank: int) -> dict[str, Optional[str]]:
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
    out: dict[str, Optional[str]] = {}
    for kind, (wl, al, bl) in layouts.items():
        wl, al, bl = (t.contiguous().clone() for t in (wl, al, bl))
        with torch.no_grad():
            got = call_merge(merger, wl.clone(), bl, al, n, n, size, group if size > 1 else None)
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
