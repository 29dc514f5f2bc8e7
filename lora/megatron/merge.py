"""lora.megatron's merge: folding every adapter (dense or expert, possibly sharded) into its base weight.

* ``merge_weight``: the formula, base + (alpha/dim) * B @ A on full or
  matching shards, in float32 (float64 for a float64 base), cast once;
* ``LoRAMerge.merge``: the formula on one rank's shards, gathering the
  sharded factor (A for a column-parallel base, B for a row-parallel one)
  over the TP group first;
* ``LoRAMerge`` called on a model (``merge_lora``): every adapter wrapper
  replaced by its base layer holding the merged weight shard. Dense adapters
  fold on the TP group, expert adapters on the expert-TP group (a grouped
  linear's ``weight{i}`` gets expert i's, or the shared, B @ A).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lora.megatron.dense_adapters import ParallelLoRALinear
from lora.megatron.expert_adapters import ExpertLoRALinear, is_expert_wrapper
from lora.megatron.layout import group_size
from lora.megatron.walk import walk_and_replace
from lora.megatron.wrapper import is_adapter_wrapper

__all__ = ["merge_weight", "LoRAMerge", "merge_lora", "merge_expert_wrapper"]


def merge_weight(
    base_weight: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    alpha: float,
    dim: int,
) -> torch.Tensor:
    """base_weight + (alpha/dim) * B @ A, computed in float32 and cast once to base_weight's dtype.

    A float64 base is computed in float64 (float32 would only lose digits).
    Shapes: base (out, in), B (out, r), A (r, in); `dim` is the denominator of
    the scale (the adapter's rank). The result is a new tensor.
    """
    if base_weight.dim() != 2 or B.dim() != 2 or A.dim() != 2:
        raise ValueError(
            f"merge_weight needs 2-D tensors, got base {tuple(base_weight.shape)}, "
            f"B {tuple(B.shape)}, A {tuple(A.shape)}"
        )
    out, inp = base_weight.shape
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"merge_weight: B {tuple(B.shape)} and A {tuple(A.shape)} disagree on the rank "
            "(B is (out, r), A is (r, in))"
        )
    if B.shape[0] != out or A.shape[1] != inp:
        raise ValueError(
            f"merge_weight: B @ A has shape ({B.shape[0]}, {A.shape[1]}) but the base weight "
            f"is {tuple(base_weight.shape)}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"merge_weight: dim={dim!r} must be an int >= 1")
    compute = torch.promote_types(base_weight.dtype, torch.float32) if base_weight.is_floating_point() else torch.float32
    delta = (B.to(compute) @ A.to(device=B.device, dtype=compute)).to(base_weight.device)
    merged = base_weight.to(compute) + (alpha / dim) * delta
    return merged.to(base_weight.dtype)


def _all_gather_dim0(t: torch.Tensor, group: Any) -> torch.Tensor:
    t = t.contiguous()
    out = torch.empty((t.shape[0] * group_size(group),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t, group=group)
    return out


@torch.no_grad()
def merge_expert_wrapper(merger: Any, module: nn.Module) -> nn.Module:
    """Fold an expert adapter into its base weights (``merger`` is a LoRAMerge); returns the base.

    SequentialMLP expert: like a dense layer, on the ETP group (column:
    gather A over ETP; row: gather B over ETP). Grouped: ``weight{i} +=
    scale * B_i @ A_i`` (shared: the same B @ A for every i), gathered the
    same way. Every rank's base shard then holds its shard of the merged
    full weight, so the merged forward equals the adapted one.
    """
    base, adapter = module.to_wrap, module.adapter
    t, group = adapter.etp_size, adapter.etp_group

    def fold(weight: torch.Tensor, i: Optional[int]) -> None:
        merged = merger.merge(
            weight, adapter.linear_out.get(i), adapter.linear_in.get(i), adapter.alpha, adapter.dim,
            tp_size=t, tp_group=group if t > 1 else None,
        )
        weight.copy_(merged)

    if isinstance(module, ExpertLoRALinear):
        fold(base.weight, None)
    else:
        for i in range(base.num_gemms):
            fold(base._parameters[f"weight{i}"], i if adapter.per_expert else None)
    return base


class LoRAMerge:
    """Fold a (possibly TP-sharded) adapter into its base weight.

    Expert adapters fold on the expert-TP group (``merge_expert_wrapper``);
    a grouped linear's ``weight{i}`` gets expert i's (or the shared) B @ A.
    Calling it on a model (or ``merge_lora(model)``) replaces every adapter
    wrapper by its base layer holding the merged weight shard; base weights
    are updated in place, so the returned model shares its layers with the
    input.
    """

    @torch.no_grad()
    def merge(
        self,
        base_weight: torch.Tensor,
        linear_out: torch.Tensor,
        linear_in: torch.Tensor,
        alpha: float,
        dim: int,
        *,
        tp_size: int = 1,
        tp_group: Any = None,
    ) -> torch.Tensor:
        if tp_size == 1:
            return merge_weight(base_weight, linear_out, linear_in, alpha, dim)
        if tp_group is None or group_size(tp_group) != tp_size:
            raise ValueError(
                f"LoRAMerge.merge: tp_size={tp_size} needs the TP process group of that size "
                f"(got {'None' if tp_group is None else f'a group of size {group_size(tp_group)}'})"
            )
        out_local, in_local = base_weight.shape
        if linear_in.shape[1] == in_local and linear_out.shape[0] == out_local:
            # Column-parallel base: A is split along r; gather it.
            linear_in = _all_gather_dim0(linear_in, tp_group)
        elif linear_out.shape[0] * tp_size == out_local:
            # Row-parallel base: B is split along out; gather it.
            linear_out = _all_gather_dim0(linear_out, tp_group)
        else:
            raise ValueError(
                f"LoRAMerge.merge: shapes base {tuple(base_weight.shape)}, linear_out {tuple(linear_out.shape)}, "
                f"linear_in {tuple(linear_in.shape)} fit neither a column-parallel nor a row-parallel shard at TP={tp_size}"
            )
        return merge_weight(base_weight, linear_out, linear_in, alpha, dim)

    @torch.no_grad()
    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """The base layer with the adapter folded in, for an adapter wrapper; anything else unchanged."""
        if not is_adapter_wrapper(module):
            return module
        if is_expert_wrapper(module):
            return merge_expert_wrapper(self, module)
        base, adapter = module.to_wrap, module.adapter
        tp_group = getattr(base, "tp_group", None) if isinstance(module, ParallelLoRALinear) else None
        merged = self.merge(
            base.weight,
            adapter.linear_out.weight,
            adapter.linear_in.weight,
            adapter.alpha,
            adapter.dim,
            tp_size=group_size(tp_group),
            tp_group=tp_group,
        )
        base.weight.copy_(merged)
        return base

    def __call__(self, model: Any) -> Any:
        def visit(module: nn.Module, name: str, prefix: str) -> tuple[nn.Module, bool]:
            new = self.transform(module, name, prefix)
            return new, new is module

        if isinstance(model, (list, tuple)):
            return type(model)(walk_and_replace(chunk, visit) for chunk in model)
        return walk_and_replace(model, visit)


def merge_lora(model: Any) -> Any:
    """Fold every adapter into its base weight; wrappers become plain base layers."""
    return LoRAMerge()(model)
