"""How a megatron-core base layer is laid out over its process group, as lora.megatron's adapters need to know it.

Group size and rank (1 and 0 without torch.distributed), megatron's expert
model-parallel group, whether a base is column- or row-parallel, whether a
``linear_fc1`` is gated ([gate; up] rows on every rank), and which rows of a
full matrix a rank holds. Nothing here builds or changes a module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "group_size",
    "group_rank",
    "expert_model_parallel_group",
    "base_parallel_kind",
    "is_gated_fc1",
    "shard_rows",
]


def group_size(group: Any) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def group_rank(group: Any) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


def expert_model_parallel_group() -> Any:
    """megatron's expert-model-parallel group, or None when it was never set up."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - megatron is a dependency of lora.megatron
        return None
    return ps.get_expert_model_parallel_group(check_initialized=False)


def base_parallel_kind(module: nn.Module) -> Optional[str]:
    """'column' or 'row' for a megatron-core parallel linear, None otherwise."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def is_gated_fc1(module: nn.Module, full_name: str) -> bool:
    """True when the module's output rows are [gate; up] on every TP rank."""
    config = getattr(module, "config", None)
    leaf = full_name.rsplit(".", 1)[-1]
    return leaf == "linear_fc1" and bool(getattr(config, "gated_linear_unit", False))


def shard_rows(full: torch.Tensor, rank: int, size: int, *, gated: bool) -> torch.Tensor:
    """The rows of ``full`` that TP rank ``rank`` of ``size`` holds.

    A gated fc1 holds its slice of the gate followed by its slice of the up
    projection; everything else is one contiguous block.
    """
    if size == 1:
        return full
    if gated:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    return torch.chunk(full, size, dim=0)[rank]
