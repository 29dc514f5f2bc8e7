"""SPEC's adapter tables: which adapter parameters each rank must hold, with their names, shards and
full shapes (harness/SPEC.md's TP table), decided from the base layers, never from what the
implementation under test says about itself.

``adapter_table``: the dense table (a TP group). ``moe_adapter_table``: the table of an MoE model,
with expert adapters split over expert TP and placed by EP, per expert or shared, and their
global names. Both raise ``SpecViolation`` naming the parameter when the implementation's names or
local shapes differ from SPEC's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.errors import SpecViolation
from harness.sharding import REPLICATED, Partition, full_shape, is_gated_fc1, shard

__all__ = [
    "adapter_modules", "adapter_partitions", "adapter_full_shapes", "adapter_table",
    "AdapterParam", "moe_adapter_table", "is_expert_name",
]


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold an adapter per SPEC naming: name -> wrapper (has to_wrap and adapter)."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "to_wrap") and hasattr(module, "adapter"):
            found[name] = module
    return found


def _base_kind(base: nn.Module) -> str:
    weight = getattr(base, "weight", None)
    if getattr(weight, "tensor_model_parallel", False):
        return "column" if int(weight.partition_dim) == 0 else "row"
    return "plain"


def _base_full_io(base: nn.Module, kind: str, tp_size: int) -> tuple[int, int]:
    out_local, in_local = base.weight.shape
    if kind == "column":
        return out_local * tp_size, in_local
    if kind == "row":
        return out_local, in_local * tp_size
    return out_local, in_local


def adapter_partitions(wrapper: nn.Module, wrapper_name: str) -> dict[str, Partition]:
    """harness/SPEC.md's TP table for the two adapter matrices of one wrapped module."""
    kind = _base_kind(wrapper.to_wrap)
    gated = is_gated_fc1(wrapper.to_wrap, wrapper_name)
    if kind == "column":
        return {"linear_in": Partition(0), "linear_out": Partition(0, gated=gated)}
    if kind == "row":
        return {"linear_in": Partition(1), "linear_out": Partition(0)}
    return {"linear_in": REPLICATED, "linear_out": REPLICATED}


def adapter_full_shapes(wrapper: nn.Module, tp_size: int, dim: int) -> dict[str, tuple[int, int]]:
    kind = _base_kind(wrapper.to_wrap)
    out_full, in_full = _base_full_io(wrapper.to_wrap, kind, tp_size)
    return {"linear_in": (dim, in_full), "linear_out": (out_full, dim)}


def adapter_table(model: nn.Module, tp_rank: int, tp_size: int, dim: int,
                  allow_empty: bool = False) -> dict[str, tuple[str, Partition, tuple[int, ...]]]:
    """Per adapter parameter: (canonical module name, partition, full shape), loading nothing.

    Checks each parameter's name and local shape against harness/SPEC.md and
    raises ``SpecViolation`` naming the module when they differ. A model
    without any adapter is one too, unless ``allow_empty`` (a pipeline stage
    may hold none: the patterns may select layers of other stages only).
    """
    table = {}
    wrappers = adapter_modules(model)
    if not wrappers and allow_empty:
        return table
    if not wrappers:
        raise SpecViolation("no module with `to_wrap` and `adapter` children: no adapter was applied (SPEC naming)")
    for wname, wrapper in wrappers.items():
        parts = adapter_partitions(wrapper, wname)
        shapes = adapter_full_shapes(wrapper, tp_size, dim)
        for which in ("linear_in", "linear_out"):
            pname = f"{wname}.adapter.{which}.weight"
            try:
                param = model.get_parameter(pname)
            except AttributeError as exc:
                raise SpecViolation(f"{wname}: missing adapter parameter {pname} (SPEC names A and B adapter.linear_in/linear_out)") from exc
            part, shape = parts[which], shapes[which]
            expected = full_shape(shape, Partition(part.dim), 1)
            local = shard(torch.empty(expected, device="meta"), part, tp_rank, tp_size).shape if part.dim is not None else expected
            if tuple(param.shape) != tuple(local):
                raise SpecViolation(
                    f"{pname}: local shape {tuple(param.shape)} on TP rank {tp_rank}/{tp_size}, SPEC expects "
                    f"{tuple(local)} (full {shape}, {part.describe()})"
                )
            table[pname] = (wname, part, tuple(shape))
    return table



_EXPERTS = re.compile(r"(^|\.)mlp\.experts(\.|$)")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_PER_EXPERT = re.compile(r"^(?P<stem>.*\.adapter\.linear_(?:in|out)\.weight)(?P<i>\d+)$")


def is_expert_name(name: str) -> bool:
    """Under ``...mlp.experts...``: a routed expert (``shared_experts`` is not one)."""
    return bool(_EXPERTS.search(name))


@dataclass(frozen=True)
class AdapterParam:
    """One adapter parameter of this rank, as SPEC says it must be laid out.

    ``name``: the local parameter name; ``global_name``: the same parameter
    in a world of size one; ``module``: the global name of the adapted
    module; ``group``: "etp" or "tp", the group it is split over;
    ``per_expert``: lives on one EP rank only (by global expert index);
    ``shared``: a grouped linear's single adapter, the same on every EP rank.
    """

    name: str
    global_name: str
    module: str
    which: str
    part: Partition
    full_shape: tuple[int, ...]
    group: str
    expert: bool
    per_expert: bool
    shared: bool


def _globalise(name: str, ep_rank: int, local: int) -> str:
    name = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{ep_rank * local + int(m.group(1))}.", name)
    m = _PER_EXPERT.match(name)
    if m:
        name = f"{m['stem']}{ep_rank * local + int(m['i'])}"
    return name


def _base_kind_and_io(base: torch.nn.Module, group_size: int) -> tuple[str, int, int]:
    """'column' / 'row' / 'plain' and the full (out, in) of a base linear, from megatron's attributes."""
    weight = getattr(base, "weight", None)
    if weight is None and hasattr(base, "num_gemms"):
        weight = getattr(base, "weight0")
    if weight is None:
        raise SpecViolation(f"{type(base).__name__}: a base linear with neither `weight` nor `weight0`")
    out_local, in_local = weight.shape
    if getattr(weight, "tensor_model_parallel", False):
        if int(weight.partition_dim) == 0:
            return "column", out_local * group_size, in_local
        return "row", out_local, in_local * group_size
    return "plain", out_local, in_local


def moe_adapter_table(model: torch.nn.Module, case: Any, sizes: dict[str, int]) -> dict[str, AdapterParam]:
    """Every adapter parameter SPEC says this rank must hold, with its global name and layout.

    Raises ``SpecViolation`` naming the parameter when the implementation's
    names or local shapes differ from SPEC's.
    """
    # No wrapper at all is legitimate here (e.g. only shared-expert patterns
    # on a model without shared experts); the comparison with the
    # reference's adapted set tells whether something was missed.
    wrappers = adapter_modules(model)
    shape = case.shape
    local = shape.num_experts // sizes["ep_size"]
    dim = int(case.lora.get("dim", 32))
    normalize = bool(case.lora.get("normalize_moe_lora", False))
    share = bool(case.lora.get("share_expert_adapters", True))
    table: dict[str, AdapterParam] = {}
    params = dict(model.named_parameters())
    for wname, wrapper in wrappers.items():
        base = wrapper.to_wrap
        expert = is_expert_name(wname)
        group = "etp" if expert else "tp"
        g_rank, g_size = (sizes["etp_rank"], sizes["etp_size"]) if expert else (sizes["tp_rank"], sizes["tp_size"])
        kind, out_full, in_full = _base_kind_and_io(base, g_size)
        r = dim // shape.moe_router_topk if (expert and normalize) else dim
        gated = wname.rsplit(".", 1)[-1] == "linear_fc1" and shape.gated_linear_unit
        if kind == "column":
            parts = {"linear_in": Partition(0), "linear_out": Partition(0, gated=gated)}
        elif kind == "row":
            parts = {"linear_in": Partition(1), "linear_out": Partition(0)}
        else:
            parts = {"linear_in": REPLICATED, "linear_out": REPLICATED}
        fulls = {"linear_in": (r, in_full), "linear_out": (out_full, r)}
        grouped = hasattr(base, "num_gemms")
        per_expert_grouped = grouped and not share
        suffixes = [str(i) for i in range(int(base.num_gemms))] if per_expert_grouped else [""]
        for which in ("linear_in", "linear_out"):
            part = parts[which]
            local_shape = tuple(shard(torch.empty(fulls[which], device="meta"), part, g_rank, g_size).shape)
            for suffix in suffixes:
                pname = f"{wname}.adapter.{which}.weight{suffix}"
                if pname not in params:
                    have = sorted(n for n in params if n.startswith(f"{wname}.adapter."))
                    raise SpecViolation(
                        f"{wname}: missing adapter parameter {pname} (SPEC: adapter.linear_in/linear_out.weight"
                        f"{', one per local expert with suffix <i> when share_expert_adapters=False' if grouped else ''}); "
                        f"found {have[:6]}"
                    )
                if tuple(params[pname].shape) != local_shape:
                    why = f"rank {r}" + (f" = dim {dim} // moe_router_topk {shape.moe_router_topk}" if expert and normalize else "")
                    raise SpecViolation(
                        f"{pname}: local shape {tuple(params[pname].shape)} on {group.upper()} rank {g_rank}/{g_size}, "
                        f"SPEC expects {local_shape} (full {fulls[which]}, {part.describe()}, {why})"
                    )
                gname = _globalise(pname, sizes["ep_rank"], local)
                table[pname] = AdapterParam(
                    name=pname,
                    global_name=gname,
                    module=_globalise(wname + ".", sizes["ep_rank"], local)[:-1] if expert else wname,
                    which=which,
                    part=part,
                    full_shape=fulls[which],
                    group=group,
                    expert=expert,
                    per_expert=expert and (not grouped or per_expert_grouped),
                    shared=expert and grouped and not per_expert_grouped,
                )
        extra = sorted(n for n in params if n.startswith(f"{wname}.adapter.") and n not in table)
        if extra:
            raise SpecViolation(f"{wname}: adapter parameters SPEC does not name: {extra[:6]}")
    return table
