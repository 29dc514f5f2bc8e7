"""lora.megatron's expert adapters in megatron-core's distributed checkpoints (SPEC "Adapter checkpoints")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from lora.megatron.layout import expert_model_parallel_group, group_rank, group_size

if TYPE_CHECKING:
    from lora.megatron.expert_adapters import ExpertAdapter

__all__ = ["expert_entries"]


def expert_entries(adapter: "ExpertAdapter", prefix: str, sharded_offsets: tuple, metadata: Any) -> dict[str, Any]:
    """An expert adapter's checkpoint entries (SPEC "Adapter checkpoints").

    One entry per layer and tensor, stacked over the model's experts: A of layer G is the entry
    ``<prefix>layer<G>.linear_in.weight`` with global shape (E, r, in) for per-expert adapters (E
    global experts; a SequentialMLP expert or a grouped linear's ``weight<i>`` is the piece at its
    global expert index), and (r, in) for a grouped linear's shared adapter. Inside each expert the
    pieces are split over the expert-TP group as the forward splits them (A along r for a column
    base, along ``in`` for a row base; B along its rows, a gated fc1's B as megatron's SwiGLU
    factory splits it: each rank's gate rows and up rows are two ranges of the full tensor).

    Megatron's containers rewrite a key's beginning only (a TransformerBlock drops the local layer
    index, a SequentialMLP the local expert index), so the global layer number goes after the
    adapter's prefix, not in front: an entry per layer, since a pattern may adapt some layers only
    and a stacked entry must cover every layer. The layer axis megatron passes down (the first
    offset) is dropped, the expert axis a SequentialMLP adds is kept.

    Replicas: a piece is held by every rank of the expert data-parallel group, and a shared adapter
    also by every EP rank (it is the same everywhere); the main replica is expert-DP rank 0 (and EP
    rank 0).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    offsets = list(sharded_offsets)
    layer = None
    if offsets and offsets[0][0] == 0:
        layer = int(offsets.pop(0)[1])
    # Whatever axes remain (a SequentialMLP's expert axis) move up by the one dropped.
    outer = [(axis - (layer is not None), off, size) for axis, off, size in offsets]
    entry = f"{prefix}layer{layer}." if layer is not None else prefix
    ep_group = expert_model_parallel_group()
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
    edp_rank = ps.get_expert_data_parallel_rank() if ps.model_parallel_is_initialized() else 0
    t, k = adapter.etp_size, adapter.etp_rank
    singleton = bool((metadata or {}).get("singleton_local_shards", False))

    def piece(name: str, tensor: torch.Tensor, axis: int, expert: Optional[int], gated: bool) -> Any:
        prepend = list(outer)
        if expert is not None:
            prepend.append((len(prepend), expert, ep_size * adapter.count))
        shared = adapter.count is None and not outer
        replica = (0, ep_rank if shared and ep_size > 1 else 0, edp_rank)
        n = len(prepend)
        sh = ShardedTensor.from_rank_offsets(f"{entry}{name}", tensor, *prepend, (n + axis, k, t),
                                             replica_id=replica, prepend_axis_num=n)
        if gated:
            sh = apply_swiglu_sharded_factory(sh, tuple(prepend), singleton, tp_group=adapter.etp_group)
        return sh

    out: dict[str, Any] = {}
    a_axis = 0 if adapter.kind == "column" else 1
    indices = [None] if adapter.count is None else list(range(adapter.count))
    for i in indices:
        expert = None if i is None else ep_rank * adapter.count + i
        suffix = "" if i is None else str(i)
        out[f"{prefix}linear_in.weight{suffix}"] = piece(
            "linear_in.weight", adapter.linear_in.get(i), a_axis, expert, False)
        out[f"{prefix}linear_out.weight{suffix}"] = piece(
            "linear_out.weight", adapter.linear_out.get(i), 0, expert, adapter.gated)
    return out
