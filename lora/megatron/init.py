"""How lora.megatron draws adapter weights: the same full matrices at every parallel layout, for a given seed.

The SPEC's draw: every adapter's A then B over the FULL, unsharded shape,
float32 on the CPU, from torch's global generator, one module at a time in
pre-order walk order. Each rank draws the full matrices and keeps its shard,
so the numbers do not depend on the layout, and equal what ``lora.reference``
draws (which implements the same draw on its own):

* ``init_full_weight`` / ``init_adapter_weights``: the draw itself;
* ``sync_global_rng_from_rank0``: every rank starts the walk from global
  rank 0's generator state, so all ranks draw the same numbers;
* ``SequentialExpertInit``: a SequentialMLP with EP > 1 is walked over its
  LOCAL experts only; once its subtree is done, the generator is rewound to
  where the walk entered it and the draws of all E global experts are
  replayed in order, keeping the local ones. The generator then stands where
  a world-size-1 walk leaves it.

(Per-expert adapters of a grouped expert linear draw every global expert in
order at construction: ``lora.megatron.expert_adapters.wrap_grouped_expert``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from lora._spec import INIT_METHODS, NORMAL_INIT_STD
from lora.megatron.layout import expert_model_parallel_group, group_rank, group_size

if TYPE_CHECKING:
    from lora.megatron.expert_adapters import ExpertAdapter

__all__ = [
    "check_init_method",
    "init_full_weight",
    "init_adapter_weights",
    "sync_global_rng_from_rank0",
    "is_sequential_experts",
    "SequentialExpertInit",
]


def check_init_method(method: object, what: str = "init method") -> None:
    """A ValueError naming the valid init methods, unless `method` is one of them."""
    if method not in INIT_METHODS:
        raise ValueError(
            f"unknown {what} {method!r}; valid names are: {', '.join(INIT_METHODS)}"
        )


def init_full_weight(
    shape: tuple[int, int],
    method: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A freshly initialised (out, in) matrix over the FULL, unsharded shape.

    Fans come from `shape`, never from a shard, and the values are always drawn
    in float32 on the CPU (from `generator`, or torch's default CPU generator)
    before the cast to `dtype` and the move to `device`: a sharded
    implementation that calls this on the full shape and slices gets, for a
    given seed, exactly the matrix the single-device reference gets.

    | method         | distribution                          |
    | xavier         | Xavier normal, std = sqrt(2/(in+out)) |
    | xavier_uniform | Xavier uniform, bound = sqrt(6/(in+out)) |
    | kaiming        | Kaiming uniform a=sqrt(5), bound = 1/sqrt(in) |
    | normal         | Normal(0, 0.2) (std 0.2)              |
    | zero           | all zeros (draws nothing)             |
    """
    check_init_method(method)
    if len(shape) != 2 or any(int(s) < 0 for s in shape):
        raise ValueError(f"init_full_weight needs a 2-D (out, in) shape, got {tuple(shape)}")
    weight = torch.empty(tuple(int(s) for s in shape), dtype=torch.float32)
    if weight.numel() == 0 or method == "zero":
        weight.zero_()
    elif method == "xavier":
        nn.init.xavier_normal_(weight, generator=generator)
    elif method == "xavier_uniform":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif method == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    else:  # "normal"
        nn.init.normal_(weight, mean=0.0, std=NORMAL_INIT_STD, generator=generator)
    return weight.to(dtype=dtype, device=device)


def init_adapter_weights(
    out_features: int,
    in_features: int,
    rank: int,
    a_method: str,
    b_method: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full A (rank, in) and B (out, rank), drawn in that order.

    lora.megatron draws every adapter through this function, one module at a
    time in walk order, on every rank, and keeps its shard: the same seed
    yields the same full adapters whatever the parallel layout, and the same
    as lora.reference draws (SPEC: init over the full shape, A then B per
    module, pre-order walk, torch's global CPU generator).
    """
    a = init_full_weight((rank, in_features), a_method, generator=generator, dtype=dtype, device=device)
    b = init_full_weight((out_features, rank), b_method, generator=generator, dtype=dtype, device=device)
    return a, b


def sync_global_rng_from_rank0() -> None:
    """Give every rank global rank 0's torch CPU generator state.

    Every rank draws each adapter's full A and B from torch's global
    generator, in walk order, and keeps its own slice; the slices only fit
    together if all ranks draw the same numbers. Rank 0's stream is left as
    it was, so rank 0 draws exactly what a single-device run draws for the
    same seed (and what ``lora.reference`` draws, by the SPEC).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    state = torch.get_rng_state()
    # NCCL only moves CUDA tensors.
    carrier = state.cuda() if dist.get_backend() == "nccl" else state.clone()
    dist.broadcast(carrier, src=0)
    torch.set_rng_state(carrier.cpu())


# --------------------------------------------------- SequentialMLP init order


def is_sequential_experts(module: object) -> bool:
    """megatron's SequentialMLP (duck-typed: a ``local_experts`` ModuleList)."""
    return isinstance(module, nn.Module) and isinstance(getattr(module, "local_experts", None), nn.ModuleList)


@dataclass
class _Frame:
    module: nn.Module
    name: str
    ep_size: int
    ep_rank: int
    num_local: int
    rng_state: Optional[torch.Tensor]
    adapters: dict[int, list[ExpertAdapter]] = field(default_factory=dict)


class SequentialExpertInit:
    """Replays a SequentialMLP's adapter draws in global expert order (EP > 1).

    ``enter`` (walk enters a module, before its children) snapshots torch's
    generator at a SequentialMLP; ``register`` records each adapter created
    under it by local expert index, in walk order; ``leave`` (its subtree
    done) restores the snapshot and, for every global expert g = e*L + i in
    0..E-1, draws the adapters of local expert i's shapes (experts are
    matched by name, and names only hold the local index, so expert g has
    the adapters local expert g mod L has), keeping them when e is this EP
    rank and discarding them otherwise. The generator then stands where a
    world-size-1 walk leaves it. Only adapters created in this walk take
    part: a second LoRA call (idempotence) draws nothing, as at world size 1.
    """

    def __init__(self) -> None:
        self._frames: list[_Frame] = []

    def reset(self) -> None:
        self._frames = []

    def enter(self, module: nn.Module, full_name: str) -> None:
        if not is_sequential_experts(module):
            return
        group = getattr(module, "ep_group", None)
        if group is None:
            group = expert_model_parallel_group()
        ep_size, ep_rank = group_size(group), group_rank(group)
        state = torch.get_rng_state() if ep_size > 1 else None
        self._frames.append(_Frame(module, full_name, ep_size, ep_rank, len(module.local_experts), state))

    def register(self, full_name: str, adapter: ExpertAdapter) -> None:
        for frame in reversed(self._frames):
            prefix = f"{frame.name}.local_experts." if frame.name else "local_experts."
            if full_name.startswith(prefix):
                index = full_name[len(prefix) :].split(".", 1)[0]
                if index.isdigit():
                    frame.adapters.setdefault(int(index), []).append(adapter)
                return

    def leave(self, module: nn.Module, full_name: str) -> None:
        if not self._frames or self._frames[-1].module is not module:
            return
        frame = self._frames.pop()
        if frame.ep_size == 1 or not frame.adapters:
            return
        torch.set_rng_state(frame.rng_state)
        for g in range(frame.ep_size * frame.num_local):
            e, i = divmod(g, frame.num_local)
            for adapter in frame.adapters.get(i, []):
                a_full, b_full = adapter.draw_full()
                if e == frame.ep_rank:
                    adapter.load_full(a_full, b_full)
