"""Full weights <-> per-rank shards, for base models and for LoRA adapters.

The harness makes every weight from a seed as a full, unsharded tensor, gives
each rank its slice, and puts per-rank gradients back together into full
tensors. Two sources of truth:

* base megatron parameters carry megatron's own ``tensor_model_parallel`` /
  ``partition_dim`` attributes; a gated ``linear_fc1`` holds, on each TP rank,
  its gate slice followed by its up slice;
* adapter parameters follow harness/SPEC.md's TP table (``harness.rules.adapters``),
  decided from the kind of the base layer (``<module>.to_wrap``), never from
  attributes the implementation under test set, so an implementation that
  lays its shards out differently is caught rather than trusted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from harness.errors import SpecViolation

__all__ = [
    "Partition",
    "REPLICATED",
    "shard",
    "unshard",
    "gather_full",
    "full_shape",
    "seeded_tensor",
    "base_partition",
    "is_gated_fc1",
    "load_full_base_weights",
    "expert_param",
    "num_local_experts",
    "load_full_adapter_weights",
    "initial_adapters",
    "SpecViolation",
]


@dataclass(frozen=True)
class Partition:
    """How a full tensor is split over a TP group: along ``dim``, gated or not."""

    dim: Optional[int]  # None: replicated
    gated: bool = False

    def describe(self) -> str:
        if self.dim is None:
            return "replicated"
        return f"split dim {self.dim}" + (" (gate/up per rank)" if self.gated else "")


REPLICATED = Partition(None)


def shard(full: torch.Tensor, part: Partition, rank: int, size: int) -> torch.Tensor:
    if part.dim is None or size == 1:
        return full
    if full.shape[part.dim] % (2 * size if part.gated else size):
        raise ValueError(f"cannot split a tensor of shape {tuple(full.shape)} ({part.describe()}) over {size} ranks")
    if part.gated:
        gate, up = torch.chunk(full, 2, dim=part.dim)
        return torch.cat(
            [torch.chunk(gate, size, dim=part.dim)[rank], torch.chunk(up, size, dim=part.dim)[rank]], dim=part.dim
        )
    return torch.chunk(full, size, dim=part.dim)[rank]


def unshard(pieces: list[torch.Tensor], part: Partition) -> torch.Tensor:
    """Inverse of ``shard``: pieces in TP-rank order."""
    if part.dim is None or len(pieces) == 1:
        return pieces[0]
    if part.gated:
        halves = [torch.chunk(p, 2, dim=part.dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=part.dim)
    return torch.cat(pieces, dim=part.dim)


def gather_full(shards: list[torch.Tensor], parts: list[Partition], group: object, size: int) -> list[torch.Tensor]:
    """The full float64 tensors of this rank's ``shards`` (split as ``parts``) over ``group`` of ``size`` ranks.

    Every rank passes shards of the same shapes in the same order (megatron
    splits evenly), so all split ones travel in one all_gather of a flat
    float64 buffer; replicated ones (``part.dim`` None) are copied here.
    """
    import torch.distributed as dist

    local = [t.detach().double() for t in shards]
    out = [t.clone() for t in local]
    split = [i for i, part in enumerate(parts) if part.dim is not None]
    if size == 1 or not split:
        return out
    flat = torch.cat([local[i].reshape(-1) for i in split])
    pieces = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(pieces, flat, group=group)
    offset = 0
    for i in split:
        n = local[i].numel()
        out[i] = unshard([piece[offset:offset + n].view(local[i].shape) for piece in pieces], parts[i])
        offset += n
    return out


def full_shape(local_shape: Iterable[int], part: Partition, size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if part.dim is not None:
        shape[part.dim] *= size
    return tuple(shape)


def seeded_tensor(seed: int, name: str, shape: tuple[int, ...], *, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """A float32 normal tensor that depends only on (seed, name, shape)."""
    digest = hashlib.sha256(f"{seed}/{name}/{shape}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def _owner_and_leaf(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def is_gated_fc1(module: nn.Module, module_name: str) -> bool:
    config = getattr(module, "config", None)
    return module_name.rsplit(".", 1)[-1] == "linear_fc1" and bool(getattr(config, "gated_linear_unit", False))


def base_partition(model: nn.Module, name: str, param: torch.Tensor) -> Partition:
    """How a base megatron parameter is split over TP, from megatron's attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return REPLICATED
    owner_name, _ = _owner_and_leaf(name)
    owner = model.get_submodule(owner_name) if owner_name else model
    return Partition(int(param.partition_dim), gated=is_gated_fc1(owner, _canonical(owner_name)))


def _canonical(name: str) -> str:
    """A base parameter's name without the LoRA wrapper's ``to_wrap`` level."""
    return name.replace(".to_wrap.", ".").replace(".to_wrap", "")


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return 0.1, 1.0
    if leaf == "bias":
        return 0.1, 0.0
    fan_in = shape[1] if len(shape) == 2 else shape[0]
    return 1.0 / fan_in**0.5, 0.0


# Routed-expert parameters, in megatron's two layouts: SequentialMLP
# (``<experts>.local_experts.<i>.<linear>.<leaf>``) and grouped experts
# (``<experts>.<linear>.<weight|bias><i>``, TE's GroupedLinear naming).
_SEQUENTIAL_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.local_experts\.(?P<i>\d+)\.(?P<rest>.+)$")
_GROUPED_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<linear>[^.]+)\.(?P<leaf>weight|bias)(?P<i>\d+)$")


def expert_param(name: str) -> Optional[tuple[str, int]]:
    """For a routed expert's parameter: (name template with ``{e}`` for the expert index, local index); else None.

    The template is the same for SequentialMLP and grouped experts
    (``decoder.layers.0.mlp.experts.{e}.linear_fc1.weight``), so both load
    the same full weights. Shared experts (``shared_experts``) are not
    routed experts.
    """
    name = _canonical(name)
    m = _SEQUENTIAL_EXPERT.match(name)
    if m:
        return f"{m['prefix']}.{{e}}.{m['rest']}", int(m["i"])
    m = _GROUPED_EXPERT.match(name)
    if m:
        return f"{m['prefix']}.{{e}}.{m['linear']}.{m['leaf']}", int(m["i"])
    return None


def num_local_experts(model: nn.Module) -> dict[str, int]:
    """Per experts module (name prefix): how many local experts this rank's model holds."""
    found: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        info = expert_param(name)
        if info is not None:
            found.setdefault(info[0].split(".{e}.")[0], set()).add(info[1])
    return {prefix: len(idx) for prefix, idx in found.items()}


@torch.no_grad()
def load_full_base_weights(
    model: nn.Module,
    seed: int,
    tp_rank: int,
    tp_size: int,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    etp_rank: Optional[int] = None,
    etp_size: Optional[int] = None,
) -> dict[str, tuple[int, ...]]:
    """Fill every base parameter with its slice of a seeded full tensor; returns full shapes.

    Dense parameters (and an MoE model's router, shared experts and norms)
    are split over TP from megatron's attributes. Routed experts: the EP
    rank's local expert i is global expert ``ep_rank * local + i`` (its full
    tensors are named by the global index, see ``expert_param``), and its
    linears are split over the expert-TP group (``etp_rank`` / ``etp_size``,
    default: same as TP). A model without experts loads exactly as before.
    """
    etp_rank = tp_rank if etp_rank is None else etp_rank
    etp_size = tp_size if etp_size is None else etp_size
    local_counts = num_local_experts(model) if ep_size > 1 else {}
    shapes = {}
    for name, param in model.named_parameters():
        if ".adapter." in f".{name}":
            continue
        part = base_partition(model, name, param)
        info = expert_param(name)
        if info is None:
            rank, size = tp_rank, tp_size
            canonical = _canonical(name)
        else:
            template, i = info
            local = local_counts.get(template.split(".{e}.")[0], 0)
            canonical = template.format(e=ep_rank * local + i)
            rank, size = etp_rank, etp_size
        shape = full_shape(param.shape, part, size)
        std, mean = _init_std(canonical, shape)
        full = seeded_tensor(seed, canonical, shape, std=std, mean=mean)
        param.copy_(shard(full, part, rank, size).to(param.dtype))
        shapes[canonical] = shape
    return shapes


@torch.no_grad()
def load_full_adapter_weights(
    model: nn.Module, seed: int, tp_rank: int, tp_size: int, dim: int, allow_empty: bool = False
) -> dict[str, tuple[str, Partition, tuple[int, ...]]]:
    """Set every adapter's A and B to slices of seeded full matrices (B non-zero).

    Checks names and shapes first (``adapter_table``, raising
    ``SpecViolation``; ``allow_empty``: a model without adapters is no
    violation, as for a pipeline stage) and returns its table.
    """
    from harness.rules.adapters import adapter_table

    table = adapter_table(model, tp_rank, tp_size, dim, allow_empty)
    for pname, (wname, part, shape) in table.items():
        which = pname.rsplit(".", 2)[-2]
        param = model.get_parameter(pname)
        # A scaled like xavier over the full matrix; B non-zero so the
        # adapter really contributes and a wrong shard shows up.
        std = 1.0 / shape[1] ** 0.5
        full = seeded_tensor(seed, f"{wname}.{which}", shape, std=std)
        param.copy_(shard(full, part, tp_rank, tp_size).to(param.dtype))
    return table


def _adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    from harness.rules.adapters import adapter_modules

    return adapter_modules(model)


def initial_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's A and B as the implementation made them: float64 CPU copies, by parameter name."""
    return {
        f"{wname}.adapter.{which}.weight": getattr(wrapper.adapter, which).weight.detach().to(device="cpu", dtype=torch.float64, copy=True)
        for wname, wrapper in _adapter_modules(model).items()
        for which in ("linear_in", "linear_out")
        if isinstance(getattr(getattr(wrapper.adapter, which, None), "weight", None), torch.Tensor)
    }
