"""Mixture-of-experts GPT tasks: megatron-core's MoE GPTModel at the case's layout, adapted, run, reported.

``run_moe_case`` returns a ``RankRecord`` like the dense task, but every
adapter tensor in it is already *full* and keyed by its *global* name: the
ranks put shards back together themselves, because an expert adapter lives
on three axes at once (split over the expert-TP group, placed by expert
index over the EP group, replicated over expert data parallelism) and the
reassembly needs those groups. All of it is harness code driven by
harness/SPEC.md's naming and TP table, never by what the implementation
under test says about itself:

* a routed expert's linears (``...mlp.experts...``) are split over the
  expert-TP (ETP) group, everything else (attention, shared experts) over TP;
* ``local_experts.<i>`` (SequentialMLP) and ``weight<i>`` (a grouped
  linear's per-expert adapter) on EP rank e name global expert ``e*L + i``;
* every dense data-parallel replica is fed the same full batch, so each
  token reaches the experts once per replica (``D = world / tp`` times in
  all): an expert adapter's gradient is summed over the expert-data-parallel
  group and divided by D, what a data-parallel optimizer would hold. A
  shared grouped adapter's own EP sum is the implementation's job (SPEC),
  so a missing one shows.

The record's ``extras`` (``harness.evidence.MoEExtras``) carry what only
the MoE properties read: the raw local shards of shared grouped adapters
right after creation and after one optimizer step (bitwise identity over
EP), the logits with the implementation's own initial adapters and after
the step (EP-size independence), and how many tokens each local expert
received.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from harness import cpu
from harness.dropout import keyed_dropout
from harness.evidence import DropoutStats, MoEExtras
from harness.families.moe.case import MoECase
from harness.contract import load_impl
from harness.families.gpt.model import causal_mask, output_layer_gathers
from harness.results import Finding
from harness.evidence import Partitioned, RankRecord
from harness.tasks.common import checked_table, cpu64, error_expecter, merge_evidence, reapply_findings, sequence_gathered, state_findings
from harness.rules.adapters import AdapterParam, moe_adapter_table
from harness.sharding import Partition, gather_full, seeded_tensor, shard

__all__ = ["run_moe_case", "load_seeded_adapters", "counting_expert_tokens", "SGD_LR"]

#: The learning rate of the one plain SGD step the task takes on the adapters.
SGD_LR = 0.1

def _group(kind: str) -> Any:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_group,
        "etp": ps.get_expert_tensor_parallel_group,
        "ep": ps.get_expert_model_parallel_group,
        "edp": ps.get_expert_data_parallel_group,
        "dp": ps.get_data_parallel_group,
    }[kind]()


def _stage_group() -> Any:
    """Every rank holding this rank's pipeline stage (the world without pipeline parallelism): the ranks
    whose adapter tables name the same global parameters."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


def assemble(values: dict[str, Optional[torch.Tensor]], table: dict[str, AdapterParam], sizes: dict[str, int]) -> dict[str, Any]:
    """Full tensors by global name: gathered over (E)TP, per-expert ones collected over EP.

    Collectives are batched: one all_reduce says which tensors every rank
    has (a missing gradient on one rank must not leave the others'
    collectives unmatched), then one all_gather per (E)TP group carries
    every split tensor (``harness.sharding.gather_full``).
    """
    names = sorted(table)
    present = torch.tensor([0 if values.get(p) is None else 1 for p in names], dtype=torch.int64)
    if sizes["world"] > 1 and names:
        dist.all_reduce(present, op=dist.ReduceOp.MIN, group=_stage_group())
    full: dict[str, Any] = {}
    by_kind: dict[str, list[tuple[str, torch.Tensor, Partition]]] = {}  # kinds in the same order on every rank
    for pname, here in zip(names, present.tolist()):
        info = table[pname]
        if here == 0:
            full[info.global_name] = None
        else:
            by_kind.setdefault(info.group, []).append((info.global_name, values[pname], info.part))
    for kind, members in by_kind.items():
        size = sizes["etp_size"] if kind == "etp" else sizes["tp_size"]
        gathered = gather_full([t for _, t, _ in members], [part for _, _, part in members], _group(kind), size)
        full.update(zip([name for name, _, _ in members], gathered))
    if sizes["ep_size"] > 1 and any(i.per_expert for i in table.values()):
        mine = {table[p].global_name: full[table[p].global_name] for p in table if table[p].per_expert}
        everyone: list[Any] = [None] * sizes["ep_size"]
        dist.all_gather_object(everyone, mine, group=_group("ep"))
        for other in everyone:
            full.update(other)
    return full


def _ddp_reduce(model: torch.nn.Module, table: dict[str, AdapterParam], layout: Any, world: int) -> None:
    """Make adapter grads what a data-parallel optimizer holds (see the module docstring).

    One all_reduce per group and dtype carries every gradient (elementwise
    the same sums as one call per tensor)."""
    dense_dp = layout.dp(world)
    # Insertion order follows the sorted table: the same buckets in the same order on every rank.
    buckets: dict[tuple[str, Any], list[torch.Tensor]] = {}
    averaged: list[torch.Tensor] = []
    for pname in sorted(table):
        info, p = table[pname], model.get_parameter(pname)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if info.expert:
            if layout.expert_dp(world) > 1:
                buckets.setdefault(("edp", p.grad.dtype), []).append(p.grad)
            averaged.append(p.grad)
        elif dense_dp > 1:
            buckets.setdefault(("dp", p.grad.dtype), []).append(p.grad)
            averaged.append(p.grad)
    for (kind, _), grads in buckets.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=_group(kind))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()
    for g in averaged:
        g.div_(dense_dp)


def full_partitions(table: dict[str, AdapterParam], full: dict[str, Any]) -> dict[str, Partitioned]:
    """The partition table of full, assembled tensors (``assemble``): every one replicated, by global
    name, the other EP ranks' per-expert adapters included."""
    partitions = {i.global_name: Partitioned(i.module, None, False, tuple(i.full_shape)) for i in table.values()}
    for name, tensor in full.items():
        if name not in partitions and tensor is not None:
            partitions[name] = Partitioned(name.split(".adapter.")[0], None, False, tuple(tensor.shape))
    return partitions




@contextlib.contextmanager
def counting_expert_tokens(model: torch.nn.Module, tokens: dict[str, list[int]]) -> Iterator[dict[str, list[int]]]:
    """Inside the block, add to ``tokens[<...mlp.experts>]`` how many tokens each local expert of that module
    receives (the token counts the experts' forward is given)."""
    def hook_for(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            counts = args[1]
            counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
            tokens[name] = [a + int(c) for a, c in zip(tokens.get(name, [0] * len(counts)), counts)]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    try:
        yield tokens
    finally:
        for handle in handles:
            handle.remove()


def load_seeded_adapters(model: torch.nn.Module, table: dict[str, AdapterParam], case: MoECase, sizes: dict[str, int],
                         seed: Optional[int] = None) -> None:
    """Every adapter's shard of a seeded full matrix by global name (B non-zero: every adapter moves the logits);
    ``seed`` the values' (default the case's)."""
    with torch.no_grad():
        for pname, info in table.items():
            full = seeded_tensor(case.seed if seed is None else seed, info.global_name, info.full_shape, std=1.0 / info.full_shape[1] ** 0.5)
            g_rank, g_size = ((sizes["etp_rank"], sizes["etp_size"]) if info.group == "etp"
                              else (sizes["tp_rank"], sizes["tp_size"]))
            model.get_parameter(pname).copy_(shard(full, info.part, g_rank, g_size))


def run_moe_case(ctx: Any, case: MoECase) -> RankRecord:
    """Forward, backward and one SGD step of a LoRA-adapted MoE GPTModel at the case's layout."""
    from megatron.core import parallel_state as ps

    if case.layout.pp > 1:
        from harness.families.moe.pipeline import run_moe_pipeline_case

        return run_moe_pipeline_case(ctx, case)
    from harness.families.moe.stage import moe_stage

    layout = case.layout
    impl, sizes, chunks = moe_stage(ctx, case)
    lora_kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    model = impl.LoRA(**lora_kwargs)(chunks[0], training=case.training)
    table, broken = checked_table(lambda: moe_adapter_table(model, case, sizes), ctx.rank, sizes["tp_rank"], sizes["tp_size"])
    if broken is not None:
        return broken
    shared = sorted(p for p, i in table.items() if i.shared)
    created = {p: model.get_parameter(p).detach().clone().cpu() for p in shared}
    initial = assemble({p: model.get_parameter(p) for p in table}, table, sizes)
    tokens: dict[str, list[int]] = {}
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    full_x = seeded_tensor(case.seed, "input", (s, b, h)).to(case.model_dtype)
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = causal_mask(s)

    def x_shard() -> torch.Tensor:
        return full_x.chunk(tp, dim=0)[tp_rank] if layout.sp else full_x

    # Value-keyed dropout masks (harness.dropout): expert adapters drop exactly
    # what the reference drops, wherever EP and ETP send the tokens.
    with keyed_dropout(model) as dropout_log:
        with torch.no_grad():
            own_output = model(ids, pos, mask, decoder_input=x_shard())

        # The harness's own adapter values: seeded full matrices by global name, B non-zero.
        load_seeded_adapters(model, table, case, sizes)
        findings = state_findings(model, {p: (i.name.split(".adapter.")[0],) for p, i in table.items()}, case)

        x = x_shard().clone().requires_grad_(True)
        with counting_expert_tokens(model, tokens):
            out = model(ids, pos, mask, decoder_input=x)
        if out.dtype != case.model_dtype:
            findings.append(Finding(
                "contract", f"logits dtype {out.dtype}, the base model computes in {case.model_dtype} "
                "(the adapter output must be cast back)", "output_dtype"))
        probe = seeded_tensor(case.seed, "probe", tuple(out.shape)).to(out.dtype)
        (out * probe).sum().backward()
        grads_local = {p: model.get_parameter(p).grad for p in table}
        shared_stepped = stepped_output = None
        if case.training:
            _ddp_reduce(model, table, layout, ctx.world_size)
            grads = assemble({p: model.get_parameter(p).grad for p in table}, table, sizes)
            with torch.no_grad():
                for pname in table:
                    p = model.get_parameter(pname)
                    p.sub_(SGD_LR * p.grad.to(p.dtype))
                stepped_output = model(ids, pos, mask, decoder_input=x_shard())
            shared_stepped = {p: model.get_parameter(p).detach().clone().cpu() for p in shared}
            stepped_output = cpu64(stepped_output)
        else:
            grads = assemble(grads_local, table, sizes)
    dropout = DropoutStats.of(dropout_log)
    own_output = cpu64(own_output)
    # Idempotence, undone before the merge (as in the dense task).
    findings += reapply_findings(model, impl, lora_kwargs, case.training, case.contract)
    # Experts fold through the implementation's own model-level merge only.
    merge = merge_evidence(model, impl, None, lora_kwargs.get("alpha", 32), lambda m: m(ids, pos, mask, decoder_input=x_shard()))
    extras = MoEExtras(dropout=dropout, merge=merge, own_output=own_output, ep_rank=sizes["ep_rank"], etp_rank=sizes["etp_rank"],
                       expert_tokens=tokens, shared_created=created, shared_stepped=shared_stepped, stepped_output=stepped_output)
    partitions = full_partitions(table, initial)
    return RankRecord(
        rank=ctx.rank,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=ps.get_data_parallel_rank(),
        output=cpu64(out),
        input_grad=cpu64(sequence_gathered(x.grad) if layout.sp else x.grad),
        adapter_grads={k: cpu64(v) for k, v in grads.items()},
        initial_adapters={k: cpu64(v) for k, v in initial.items()},
        partitions=partitions,
        findings=findings,
        extras=extras,
    )


def run_moe_error_case(ctx: Any, case: MoECase) -> Any:
    """Bad LoRA input on an MoE model must give SPEC's errors, naming the module, the value and the rule.

    normalize_moe_lora with a dim not divisible by top-k (ValueError naming
    dim and top-k); an expert rank not divisible by the expert-TP size on a
    column-parallel expert linear (ValueError naming the module, the rank
    and ETP); a pattern selecting the router, which has no adapter
    (TypeError naming the module and its type).
    """
    from megatron.core import parallel_state as ps

    from harness.contract import contract_point
    from harness.evidence import ErrorRecord
    from harness.families.moe.model import build_moe_stage
    from harness.pipeline import chunks_of, global_view, handed_over

    layout = case.layout
    layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    shape = case.shape
    etp = layout.etp_size
    findings: list[Finding] = []

    def fresh_model() -> Any:
        """The model as megatron hands it over: at a pipeline layout this rank's stage."""
        return handed_over(build_moe_stage(case, parallel_output=not output_layer_gathers(case.contract)), layout)

    # Errors name modules by the whole model's names: a stage's first router is its first layer's.
    view = global_view(chunks_of(fresh_model()))
    first = min(int(k) for k in view.get_submodule("decoder.layers")._modules)
    expect = error_expecter(case.contract, findings)

    topk = shape.moe_router_topk
    if topk > 1:
        dim = topk * (1 + case.seed % 3) + 1
        expect(
            "normalize_topk", f"normalize_moe_lora=True with dim={dim}, moe_router_topk={topk}", ("ValueError",), (),
            [str(dim), str(topk)],
            lambda: impl.LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=dim, normalize_moe_lora=True)(fresh_model()),
        )
    if etp > 1:
        dim = etp * (1 + case.seed % 2) + 1
        expect(
            "rank_divisible", f"dim={dim} at ETP={etp} on column-parallel expert linears", ("ValueError",), ("AssertionError", "ValueError"),
            [".mlp.experts.", str(dim), str(etp)],
            lambda: impl.LoRA(target_modules=["*.experts.*linear_fc1"], dim=dim)(fresh_model()),
        )
    router_point = contract_point("router_target")
    router = f"decoder.layers.{first}.mlp.router"
    expect(
        "router_target", "target_modules=['*.mlp.router'] selecting the router, which has no adapter",
        router_point.strict_errors, router_point.bridge_errors, [router, type(view.get_submodule(router)).__name__],
        lambda: impl.LoRA(target_modules=["*.mlp.router"], dim=math.lcm(layout.tp, etp) * topk)(fresh_model()),
    )
    return ErrorRecord(rank=ctx.rank, tp_rank=ps.get_tensor_model_parallel_rank(), findings=findings)
