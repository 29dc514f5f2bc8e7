"""Which base layers the reference can adapt, and their shapes: linear-type recognition, grouped expert linears, TP size.

A linear-type module (what exclude mode selects) is a `torch.nn.Linear`, a
megatron-core `ColumnParallelLinear` / `RowParallelLinear` (recognised only
when megatron is already loaded: nothing here imports it), a grouped expert
linear (duck-typed: `num_gemms` and `weight0..`) or a Transformer Engine
linear (by class name). The reference adapts the first three when their TP
group has size 1: `_base_shape` and `_grouped_base_shape` give their shapes,
or the `ValueError` (sharded) / `TypeError` (no reference adapter) the SPEC asks for.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lora import _spec


def _megatron_parallel_linear_classes() -> tuple[type, ...]:
    """megatron-core's (ColumnParallelLinear, RowParallelLinear), if megatron is loaded; () otherwise."""
    layers = sys.modules.get(_spec.MEGATRON_LAYERS_MODULE)
    if layers is None:
        return ()
    return (layers.ColumnParallelLinear, layers.RowParallelLinear)


def _is_transformer_engine_linear(module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        if cls.__name__ in _spec.TE_LINEAR_CLASS_NAMES:
            return True
        where = getattr(cls, "__module__", "") or ""
        if cls.__name__ in _spec.TE_OWN_LINEAR_CLASS_NAMES and where.startswith(_spec.TE_MODULE_PREFIX):
            return True
    return False


def _grouped_weights(module: nn.Module) -> Optional[list[torch.Tensor]]:
    """[weight0 .. weight{n-1}] of a grouped expert linear, else None.

    Duck-typed: an int `num_gemms` = n >= 1 and n 2-D parameters
    `weight{i}` registered on the module itself (an adapter wrapper, which
    forwards attribute reads to its base, has none of its own).
    """
    n = getattr(module, "num_gemms", None)
    if type(n) is not int or n < 1:
        return None
    own = module._parameters
    weights = []
    for i in range(n):
        w = own.get(f"weight{i}")
        if w is None or w.dim() != 2:
            return None
        weights.append(w)
    return weights


def _is_grouped_linear(module: nn.Module) -> bool:
    return _grouped_weights(module) is not None


def _is_linear_type(module: nn.Module) -> bool:
    """Plain nn.Linear, megatron-core column/row parallel linear, a grouped expert linear, or a Transformer Engine linear."""
    if isinstance(module, nn.Linear):
        return True
    if _is_grouped_linear(module):
        return True
    megatron_classes = _megatron_parallel_linear_classes()
    if megatron_classes and isinstance(module, megatron_classes):
        return True
    return _is_transformer_engine_linear(module)


def _group_size(group: Any) -> int:
    """World size of a process group; 1 for None or without an initialised torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _tp_group_size(module: nn.Module) -> int:
    return _group_size(getattr(module, "tp_group", None))


def _grouped_tp_size(module: nn.Module) -> int:
    """How many ranks share a grouped linear's weights: the largest of its TP group sizes and `tp_size`.

    megatron's TEGroupedLinear with explicit expert communication hands TE
    `tp_group=None, tp_size=1` and keeps the real expert-TP group as
    `_tp_group`, so both attributes are consulted.
    """
    sizes = [_group_size(getattr(module, "tp_group", None)), _group_size(getattr(module, "_tp_group", None))]
    tp_size = getattr(module, "tp_size", None)
    if type(tp_size) is int:
        sizes.append(tp_size)
    return max(sizes)


def _base_shape(module: nn.Module, full_name: str) -> tuple[int, int, torch.Tensor]:
    """(in_features, out_features, weight) of a base the reference can adapt, else an error."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.weight
    megatron_classes = _megatron_parallel_linear_classes()
    if megatron_classes and isinstance(module, megatron_classes):
        size = _tp_group_size(module)
        if size != 1:
            raise ValueError(
                f"{full_name} ({type(module).__name__}) is sharded over a TP group of size {size}; "
                "the reference LoRA is single-device: use lora.megatron for parallel layers"
            )
        weight = getattr(module, "weight", None)
        if weight is None:
            raise TypeError(
                f"{full_name} ({type(module).__name__}) has no weight of its own "
                "(skip_weight_param_allocation); the reference LoRA cannot adapt it"
            )
        return module.input_size, module.output_size, weight
    kind = type(module)
    raise TypeError(
        f"LoRA selected {full_name or '<root>'} of type {kind.__module__}.{kind.__qualname__}, "
        "which has no reference adapter: the reference adapts torch.nn.Linear, megatron-core "
        "ColumnParallelLinear/RowParallelLinear and grouped expert linears (num_gemms, weight0..) "
        "at TP size 1; narrow target_modules or use lora.megatron for Transformer Engine layers"
    )


def _grouped_base_shape(module: nn.Module, full_name: str) -> tuple[int, int, list[torch.Tensor]]:
    """(in_features, out_features, [weight0 ..]) of a grouped expert linear the reference can adapt, else an error."""
    size = _grouped_tp_size(module)
    if size != 1:
        raise ValueError(
            f"{full_name} ({type(module).__name__}) is a grouped expert linear sharded over a TP group "
            f"of size {size}; the reference LoRA is single-device: use lora.megatron for parallel layers"
        )
    weights = _grouped_weights(module)
    assert weights is not None
    out_features, in_features = weights[0].shape
    for i, w in enumerate(weights):
        if tuple(w.shape) != (out_features, in_features):
            raise TypeError(
                f"{full_name} ({type(module).__name__}): weight{i} has shape {tuple(w.shape)}, "
                f"weight0 has {(out_features, in_features)}; the reference needs equal expert shapes"
            )
    return in_features, out_features, weights
