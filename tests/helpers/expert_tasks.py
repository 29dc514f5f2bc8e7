"""Rank tasks for tests/lora/test_megatron_experts.py: lora.megatron on megatron-core MoE GPTs, CPU/gloo.

Top-level functions ``fn(ctx, ...)`` run inside rank-pool processes
(``harness.pool``). Each brings parallel_state into a layout, builds the
MoE GPT of ``harness.families.moe.model`` for every case asked for, loads the seeded full
base weights, applies ``lora.megatron.LoRA`` and returns plain tensors.

Adapter values are set here from seeded FULL matrices named by the GLOBAL
expert index (``set_full_adapters``), and sharded by rules written from the
SPEC (never read from the implementation): an expert linear_fc1 is a column
base (A split along r, B's rows split with the gate/up layout), linear_fc2 a
row base (A split along ``in``, B's rows split), both over the expert-TP
group; dense linears (shared experts) follow the SPEC's TP table over TP.
"""

from __future__ import annotations

import re
import traceback
import warnings
from typing import Any, Optional

import torch
from torch import nn

from harness.layouts import ParallelLayout
from harness.families.gpt.model import causal_mask
from harness.families.moe.model import MoEShape, build_moe_gpt, expert_sizes, layout_sizes
from harness.rules.adapters import adapter_full_shapes, adapter_partitions
from harness.sharding import Partition, load_full_base_weights, seeded_tensor, shard

TARGETS = ["linear_fc1", "linear_fc2"]

# A routed expert's adapter parameter, per layout kind:
#   SequentialMLP      <experts>.local_experts.<i>.<linear>.adapter.<which>.weight
#   grouped per-expert <experts>.<linear>.adapter.<which>.weight<i>
#   grouped shared     <experts>.<linear>.adapter.<which>.weight
_SEQ = re.compile(r"^(?P<experts>.*\.mlp\.experts)\.local_experts\.(?P<i>\d+)\.(?P<linear>linear_fc[12])\.adapter\.(?P<which>linear_in|linear_out)\.weight$")
_GRP = re.compile(r"^(?P<experts>.*\.mlp\.experts)\.(?P<linear>linear_fc[12])\.adapter\.(?P<which>linear_in|linear_out)\.weight(?P<i>\d*)$")


def _error(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc), "files": [f.filename for f in frames]}


def shape_of(case: dict[str, Any]) -> MoEShape:
    return MoEShape(
        dispatcher=case["dispatcher"],
        grouped=case["grouped"],
        shared_expert_ffn_hidden_size=case.get("shared_expert"),
    )


def adapter_key(name: str, ep_rank: int, num_local: int) -> Optional[tuple[str, str]]:
    """(canonical key, kind) of an adapter parameter; kind 'expert' (keyed by global expert), 'shared' or 'dense'.

    Routed experts' keys hold the global index, ``<experts>.{g}.<linear>.adapter.<which>``,
    the same for SequentialMLP and per-expert grouped adapters; a shared
    grouped adapter is ``<experts>.shared.<linear>.adapter.<which>``.
    """
    if ".adapter." not in name:
        return None
    m = _SEQ.match(name)
    if m is None:
        m = _GRP.match(name)
        if m is not None and m["i"] == "":
            return f"{m['experts']}.shared.{m['linear']}.adapter.{m['which']}", "shared"
    if m is not None:
        g = ep_rank * num_local + int(m["i"])
        return f"{m['experts']}.{g}.{m['linear']}.adapter.{m['which']}", "expert"
    if ".mlp.experts." in name:
        raise AssertionError(f"routed-expert adapter parameter with an unexpected name: {name}")
    return name.removesuffix(".weight"), "dense"


def expert_adapter_layout(key: str, shape: MoEShape, dim: int) -> tuple[Partition, tuple[int, int]]:
    """SPEC partition over ETP and full shape of a routed-expert adapter matrix (from its key alone)."""
    linear, which = key.split(".")[-3], key.split(".")[-1]
    ffn = shape.moe_ffn_hidden_size
    if linear == "linear_fc1":  # column base: (2*ffn if gated, hidden)
        out_f, in_f = (2 * ffn if shape.gated_linear_unit else ffn), shape.hidden_size
        part = Partition(0) if which == "linear_in" else Partition(0, gated=shape.gated_linear_unit)
    else:  # row base: (hidden, ffn)
        out_f, in_f = shape.hidden_size, ffn
        part = Partition(1) if which == "linear_in" else Partition(0)
    full = (dim, in_f) if which == "linear_in" else (out_f, dim)
    return part, full


def _param_table(model: nn.Module, shape: MoEShape, sizes: dict[str, int], dim: int) -> dict[str, dict[str, Any]]:
    """Per adapter parameter: key, kind, partition, shard rank/size, full shape."""
    num_local = shape.num_experts // sizes["ep_size"]
    wrappers = {n: m for n, m in model.named_modules() if hasattr(m, "to_wrap") and hasattr(m, "adapter")}
    table = {}
    for name, p in model.named_parameters():
        info = adapter_key(name, sizes["ep_rank"], num_local)
        if info is None:
            continue
        key, kind = info
        if kind == "dense":
            wname, which = name.rsplit(".adapter.", 1)
            which = which.split(".")[0]
            wrapper = wrappers[wname]
            part = adapter_partitions(wrapper, wname)[which]
            tp = sizes["tp_size"]
            full = adapter_full_shapes(wrapper, tp, dim)[which]
            rank, size = sizes["tp_rank"], tp
        else:
            part, full = expert_adapter_layout(key, shape, dim)
            rank, size = sizes["etp_rank"], sizes["etp_size"]
        local = tuple(shard(torch.empty(full, device="meta"), part, rank, size).shape)
        if tuple(p.shape) != local:
            raise AssertionError(f"{name}: local shape {tuple(p.shape)}, SPEC expects {local} (full {full}, {part.describe()}, rank {rank}/{size})")
        table[name] = {"key": key, "kind": kind, "part": part, "rank": rank, "size": size, "full": full}
    return table


@torch.no_grad()
def set_full_adapters(model: nn.Module, table: dict[str, dict[str, Any]], seed: int) -> None:
    """Every adapter matrix := its shard of a seeded full matrix named by its canonical (global) key."""
    for name, p in model.named_parameters():
        if name not in table:
            continue
        t = table[name]
        full = seeded_tensor(seed, t["key"], t["full"], std=1.0 / t["full"][1] ** 0.5)
        p.copy_(shard(full, t["part"], t["rank"], t["size"]).to(p.dtype))


def _seq_shard(full: torch.Tensor, tp_rank: int, tp: int, sp: bool) -> torch.Tensor:
    return torch.chunk(full, tp, dim=0)[tp_rank] if sp and tp > 1 else full


def _break(how: Optional[str]):
    """Patch a known-wrong ETP step into lora.megatron's expert adapter; returns an undo function.

    "row_full_width": a row (fc2) adapter gathers B's output to full width
    on every ETP rank (the dispatcher's ETP sum then counts it ETP times).
    "no_copy_allreduce": the copy-to-region after A's gather / all-reduce is
    left out (forward exact; A's gradient misses the other ETP ranks' terms).
    "no_init_replay": a SequentialMLP's adapters keep the draws of the walk
    (local experts drawn as if they were global experts 0..L-1).
    """
    from megatron.core.tensor_parallel import mappings

    from lora.megatron.expert_adapters import ExpertAdapter

    if how is None:
        return lambda: None
    if how == "row_full_width":
        attr = "_to_base_layout"
        original = ExpertAdapter._to_base_layout

        def broken(self, out):
            if self.kind == "row" and self.etp_size > 1:
                return mappings.gather_from_tensor_model_parallel_region(out, group=self.etp_group)
            return original(self, out)
    elif how == "no_copy_allreduce":
        attr = "_complete_rank_grad"
        original = ExpertAdapter._complete_rank_grad

        def broken(self, h):
            return h
    elif how == "no_init_replay":
        from lora.megatron.init import SequentialExpertInit

        def broken(self, module, full_name):
            if self._frames and self._frames[-1].module is module:
                self._frames.pop()

        original = SequentialExpertInit.leave
        SequentialExpertInit.leave = broken
        return lambda: setattr(SequentialExpertInit, "leave", original)
    else:
        raise ValueError(how)
    setattr(ExpertAdapter, attr, broken)
    return lambda: setattr(ExpertAdapter, attr, original)


def _apply_lora(model: nn.Module, seed: int, lora_kw: dict[str, Any], training: bool = True) -> nn.Module:
    from lora.megatron import LoRA

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoRA(**lora_kw)(model, training=training)


def _run_case(seed: int, layout: ParallelLayout, sizes: dict[str, int], case: dict[str, Any], dtype: torch.dtype, merge: bool) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from lora.megatron import LoRA, merge_lora

    shape = shape_of(case)
    dim = case.get("dim", 4)
    model = build_moe_gpt(shape, **layout_sizes(layout), params_dtype=dtype).to(dtype)
    load_full_base_weights(model, seed, **sizes)
    lora_kw = dict(target_modules=TARGETS, dim=dim, alpha=8, lora_B_init_method="normal",
                   share_expert_adapters=case.get("share", True))
    model = _apply_lora(model, seed, lora_kw)
    rng_after = torch.get_rng_state()
    table = _param_table(model, shape, sizes, dim)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if n in table}
    # Idempotence: a second application (same or fresh config) changes nothing and draws nothing.
    ids = {n: id(p) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = LoRA(**lora_kw)(model)
    idempotent = (
        again is model
        and {n: id(p) for n, p in again.named_parameters()} == ids
        and all(torch.equal(p, init[n]) for n, p in again.named_parameters() if n in init)
        and torch.equal(torch.get_rng_state(), rng_after)
    )
    set_full_adapters(model, table, seed)
    s, b = shape.seq_length, shape.micro_batch_size
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    x_full = seeded_tensor(seed, "input", (s, b, shape.hidden_size)).to(dtype)
    x = _seq_shard(x_full, tp_rank, tp, layout.sp).clone().requires_grad_(True)
    ids_ = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    logits = model(ids_, pos, causal_mask(s), decoder_input=x)
    probe = seeded_tensor(seed, "probe", tuple(logits.shape)).to(logits.dtype)
    (logits * probe).sum().backward()
    params = {
        n: dict(table[n], init=init[n], grad=None if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
        if n in table
    }
    out: dict[str, Any] = {
        "logits": logits.detach(),
        "input_grad": x.grad.detach(),
        "params": params,
        "rng_after": rng_after,
        "idempotent": idempotent,
        "base_grads": sorted(n for n, p in model.named_parameters() if n not in table and p.grad is not None),
        "wrapper_types": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "to_wrap")}),
    }
    if merge:
        model.eval()
        with torch.no_grad():
            adapted = model(ids_, pos, causal_mask(s), decoder_input=x.detach())
            merged_model = merge_lora(model)
            merged = merged_model(ids_, pos, causal_mask(s), decoder_input=x.detach())
        out["merge"] = {
            "adapted": adapted,
            "merged": merged,
            "wrappers_left": [n for n, m in merged_model.named_modules() if hasattr(m, "to_wrap")],
        }
    out["edp_rank"] = ps.get_expert_data_parallel_rank()
    out["edp_size"] = ps.get_expert_data_parallel_world_size()
    return out


def expert_lora_run(
    ctx: Any,
    seed: int,
    layout_name: str,
    cases: list[dict[str, Any]],
    dtype: torch.dtype = torch.float64,
    break_how: Optional[str] = None,
    merge: bool = False,
) -> dict[str, Any]:
    """lora.megatron on an MoE GPT per case at ``layout_name``: init values, RNG, logits, grads (errors as results)."""
    layout = ParallelLayout.parse(layout_name)
    layout.initialize_megatron(ctx.world_size, seed=seed)
    sizes = expert_sizes()
    undo = _break(break_how)
    results = {}
    try:
        for case in cases:
            try:
                results[case["id"]] = dict(_run_case(seed, layout, sizes, case, dtype, merge), error=None)
            except Exception as exc:  # noqa: BLE001 - the error is the result
                results[case["id"]] = {"error": _error(exc)}
    finally:
        undo()
    return {"rank": ctx.rank, **sizes, "cases": results}


def expert_lora_misc(ctx: Any, seed: int, layout_name: str) -> dict[str, Any]:
    """normalize_moe_lora ranks, the ETP divisibility error, training=False, topk errors: per expert kind."""
    layout = ParallelLayout.parse(layout_name)
    layout.initialize_megatron(ctx.world_size, seed=seed)
    sizes = expert_sizes()
    out: dict[str, Any] = {"rank": ctx.rank, **sizes}

    def build(grouped: bool, shared_expert: Optional[int] = None) -> nn.Module:
        shape = MoEShape(grouped=grouped, shared_expert_ffn_hidden_size=shared_expert)
        model = build_moe_gpt(shape, **layout_sizes(layout), params_dtype=torch.float64).to(torch.float64)
        load_full_base_weights(model, seed, **sizes)
        return model

    for grouped in (False, True):
        k = "grouped" if grouped else "sequential"
        # normalize_moe_lora: experts get dim // topk (topk=2), shared experts keep dim.
        model = _apply_lora(build(grouped, 32), seed, dict(target_modules=TARGETS, dim=4, normalize_moe_lora=True))
        out[f"{k}_normalized_shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters() if ".adapter." in n}
        # training=False: everything frozen, eval mode.
        model = _apply_lora(build(grouped), seed, dict(target_modules=TARGETS, dim=4), training=False)
        out[f"{k}_inference"] = {
            "any_trainable": any(p.requires_grad for p in model.parameters()),
            "any_training": any(m.training for m in model.modules()),
            "adapters": sum(1 for n, _ in model.named_parameters() if ".adapter." in n),
        }
        errors = {}
        for what, kw in {
            "dim_not_divisible_by_etp": dict(target_modules=TARGETS, dim=3),
            "dim_not_divisible_by_topk": dict(target_modules=TARGETS, dim=3, normalize_moe_lora=True),
        }.items():
            try:
                _apply_lora(build(grouped), seed, kw)
                errors[what] = None
            except Exception as exc:  # noqa: BLE001 - the error is the result
                errors[what] = _error(exc)
        out[f"{k}_errors"] = errors
        # lora_dtype: adapters in bfloat16, the sum in the base's float64.
        model = _apply_lora(build(grouped), seed, dict(target_modules=TARGETS, dim=4, lora_dtype=torch.bfloat16,
                                                        lora_B_init_method="normal"))
        shape = MoEShape(grouped=grouped)
        s, b = shape.seq_length, shape.micro_batch_size
        x = torch.chunk(seeded_tensor(seed, "input", (s, b, shape.hidden_size)).double(), sizes["tp_size"], dim=0)[sizes["tp_rank"]]
        with torch.no_grad():
            logits = model(torch.zeros(b, s, dtype=torch.long), torch.arange(s).unsqueeze(0).expand(b, s), causal_mask(s), decoder_input=x)
        out[f"{k}_lora_dtype"] = {
            "adapter_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if ".adapter." in n}),
            "logits_dtype": str(logits.dtype),
            "finite": bool(torch.isfinite(logits).all()),
        }
    from lora.megatron.config import find_moe_router_topk

    model = build(True)
    out["topk_found"] = {
        n: find_moe_router_topk(m)
        for n, m in model.named_modules()
        if n.endswith(("experts.linear_fc1", "local_experts.0.linear_fc1"))
    }
    return out
