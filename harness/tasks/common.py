"""Rank-side helpers every family's tasks share: megatron set-up, contract findings on the adapted
model (trainable set, dtypes, idempotence), merge evidence, collectives, the bad-input expecter.

Public names only: a family's tasks (``harness.families.<name>.tasks``) import from here, never
from another family's tasks.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from harness.contract import load_impl
from harness.evidence import MergeEvidence
from harness.results import Finding
from harness.evidence import RankRecord
from harness.errors import SpecViolation

__all__ = [
    "stage_record",
    "setup", "any_rank", "checked_table", "violation_record", "cpu64", "replicated_masks", "merge_evidence",
    "sequence_gathered", "state_findings", "reapply_findings", "idempotence_findings", "error_expecter", "BRIDGE_SILENT",
]


def setup(ctx: Any, case: Any) -> tuple[Any, int, int]:
    from megatron.core import parallel_state

    case.layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    return impl, parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank of the world (every rank calls this, or none)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def checked_table(make: Callable[[], Any], rank: int, tp_rank: int, tp_size: int) -> tuple[Any, Any]:
    """``(make(), None)``, or ``(None, violation_record)`` on every rank when ``make`` raised
    ``SpecViolation`` on any rank (the adapters' names or shapes are off harness/SPEC.md). Under pipeline
    parallelism ``make`` may find a stage without adapters (``allow_empty``); the model as a whole must
    hold one."""
    from megatron.core import parallel_state

    try:
        table, violation = make(), None
    except SpecViolation as exc:
        table, violation = None, str(exc)
    if violation is None and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        import torch.distributed as dist

        held = torch.tensor([1 if table else 0])
        dist.all_reduce(held, op=dist.ReduceOp.MAX, group=parallel_state.get_pipeline_model_parallel_group())
        if not held.item():
            violation = ("no module of any pipeline stage has `to_wrap` and `adapter` children: no adapter was "
                         "applied (SPEC naming)")
    if any_rank(violation is not None):
        return None, violation_record(rank, tp_rank, tp_size, parallel_state.get_data_parallel_rank(), violation)
    return table, None


def violation_record(rank: int, tp_rank: int, tp_size: int, dp_rank: int, violation: Any) -> RankRecord:
    """What a rank sends when the adapters' names or shapes break harness/SPEC.md (on it or another rank):
    no tensors, one contract finding that every property of the example reports."""
    message = violation or "another rank found the adapters' names or shapes off harness/SPEC.md"
    return RankRecord(
        rank=rank, tp_rank=tp_rank, tp_size=tp_size, dp_rank=dp_rank, output=None, input_grad=None,
        adapter_grads={}, initial_adapters={}, partitions={},
        findings=[Finding("contract", message, "adapter_layout")],
    )


def cpu64(t: Any) -> Any:
    """A float64 CPU copy: never a view of a live tensor (float64 parameters change in place later)."""
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def replicated_masks(model: torch.nn.Module, forward: Callable[[Any], Any],
                     sequence_shard: Optional[int] = None) -> Optional[list[str]]:
    """With the implementation's own (real) dropout: each dropout call whose input is the same on
    every TP rank must draw the same mask on every rank (else the sharded result is no single-device
    dropout). Returns what broke that rule; None when no call could decide it.

    Equal values are evidence of a replicated tensor only where they cannot be different positions
    that happen to be equal. Under sequence parallelism (``sequence_shard``: the local sequence
    length s/t) a call whose input has s/t rows may be each rank's own sequence shard: different
    tokens, which a single-device dropout masks independently, and which a degenerate model can
    make equal (a saturated causal softmax gives the first two tokens the same attention output).
    Such a call decides nothing here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from harness.dropout import capture_dropout

    with torch.no_grad(), capture_dropout() as log:
        forward(model)
    group = parallel_state.get_tensor_model_parallel_group()
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, log.records, group=group)
    if len({len(r) for r in everyone}) > 1:
        return [f"TP ranks made different numbers of dropout calls: {[len(r) for r in everyone]}"]
    wrong = []
    decided = False
    for i, calls in enumerate(zip(*everyone)):
        shapes_inputs = {(shape, digest) for shape, digest, _ in calls}
        masks = {mask for _, _, mask in calls}
        if len(shapes_inputs) == 1 and sequence_shard is not None and calls[0][0] and calls[0][0][0] == sequence_shard:
            continue  # possibly each rank's own tokens: equal by coincidence, not by layout
        decided = True
        if len(shapes_inputs) == 1 and len(masks) > 1:
            wrong.append(f"dropout call {i} on a tensor of shape {list(calls[0][0])} that is the same on every TP rank "
                         f"drew {len(masks)} different masks across the {len(calls)} TP ranks")
    return wrong if decided else None


def merge_evidence(model: Any, impl: Any, table: Any, alpha: float, forward: Callable[[Any], Any]) -> MergeEvidence:
    """Merge evidence (``harness.tasks.merge``), or what the implementation raised while merging
    (with what was made before it raised)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from harness.tasks.merge import cast_once, fold_model, module_merges

    modules = fold = once = error = None
    try:
        modules = module_merges(model, impl, table, alpha) if table is not None else {}
        fold = fold_model(model, impl, forward, alpha)
        group = parallel_state.get_tensor_model_parallel_group()
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        once = cast_once(impl, group, size, parallel_state.get_tensor_model_parallel_rank())
    except Exception as exc:  # noqa: BLE001 - reported by merge_matches alone
        error = f"{type(exc).__name__}: {exc}"
    return MergeEvidence(modules=modules, fold=fold, cast_once=once, error=error)


def sequence_gathered(shard: Any) -> Any:
    """The full-sequence tensor from every TP rank's sequence shard (harness-side, for the comparison)."""
    if shard is None:
        return None
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=0)


def state_findings(model: torch.nn.Module, table: dict[str, Any], case: Any) -> list[Finding]:
    """Trainable set, mode and adapter dtypes per SPEC.

    training=True: adapters trainable, everything else frozen, train mode.
    training=False (inference, as in Megatron-Bridge): everything frozen, eval mode.
    """
    found = []
    if model.training != case.training:
        found.append(Finding("contract", f"model.training={model.training} after LoRA(...)(model, training={case.training})", "mode"))
    for name, param in model.named_parameters():
        is_adapter = name in table
        want = is_adapter and case.training
        if param.requires_grad != want:
            kind = "adapter" if is_adapter else "base"
            why = "" if case.training else " (training=False freezes everything)"
            found.append(Finding("contract", f"{kind} parameter {name} has requires_grad={param.requires_grad}{why}", "trainable_set"))
        if is_adapter:
            base = model.get_submodule(table[name][0]).to_wrap
            # A grouped expert linear holds weight0..weight<n-1> (TE's naming).
            base_weight = getattr(base, "weight", None)
            if base_weight is None:
                base_weight = getattr(base, "weight0")
            expected = case.lora_dtype or base_weight.dtype
            if param.dtype != expected:
                # Bridge ignores lora_dtype on the parallel path: advisory there.
                found.append(Finding(
                    "contract", f"adapter parameter {name} has dtype {param.dtype}, lora_dtype says {expected}",
                    "lora_dtype", binding=case.contract == "strict" or case.lora_dtype is None,
                ))
    return found


def reapply_findings(model: torch.nn.Module, impl: Any, lora_kwargs: dict[str, Any], training: bool,
                      contract: str = "strict", *, handed: Any = None,
                      names: Optional[Callable[[Any], torch.nn.Module]] = None) -> list[Finding]:
    """Applying the same LoRA again must change nothing (SPEC: idempotent); raising is a finding too
    (every miss advisory under the bridge contract: contract point ``idempotent``).

    ``handed``: what the implementation is given (default ``model``), e.g. a pipeline stage's
    chunks, with ``model`` their ``harness.pipeline.global_view``; ``names(result)`` turns what it
    returns into a module with comparable parameter names (default: the result itself)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    roots = [model] + ([] if handed is None else list(handed) if isinstance(handed, (list, tuple)) else [handed])
    every = {id(m): m for root in roots for m in root.modules()}
    tree = [(m, dict(m._modules), m.training) for m in every.values()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        again = impl.LoRA(**lora_kwargs)(model if handed is None else handed, training=training)
        again_named = names(again) if names is not None else again
        return idempotence_findings(before, dict(again_named.named_parameters()), contract)
    except Exception as exc:  # noqa: BLE001 - this check's finding alone
        return [Finding("contract", f"applying LoRA a second time raised {type(exc).__name__}: {exc}", "idempotent",
                        binding=contract == "strict")]
    finally:
        # Undo whatever the second application did, so what runs after this
        # check (the merge) sees the model of the first application.
        for module, children, mode in tree:
            module._modules.clear()
            module._modules.update(children)
            module.training = mode
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in before:
                    param.requires_grad_(flags[name])
                    if param.shape == before[name].shape:
                        param.copy_(before[name])


def idempotence_findings(before: dict[str, Any], after: dict[str, Any], contract: str) -> list[Finding]:
    strict = contract == "strict"
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    if added or removed:
        return [Finding("contract", f"applying LoRA twice changed the parameters: added {added[:4]}, removed {removed[:4]}",
                        "idempotent", binding=strict)]
    for name in sorted(before):
        if not torch.equal(before[name], after[name].detach()):
            return [Finding("contract", f"applying LoRA twice changed the values of {name}", "idempotent", binding=strict)]
    return []


def error_expecter(contract: str, findings: list[Finding]) -> Callable[..., None]:
    """``expect(check, what, errors, bridge_errors, fragments, make)``: ``make()`` must raise one of
    ``errors`` naming every fragment; otherwise a contract finding goes to ``findings`` (advisory
    under the bridge contract when Bridge's own error type was raised)."""

    def expect(check: str, what: str, errors: tuple[str, ...], bridge_errors: tuple[str, ...], fragments: list[str], make: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make()
        except Exception as exc:  # noqa: BLE001 - the kind of error is what is checked
            name = type(exc).__name__
            missing = [f for f in fragments if f not in str(exc)]
            if name in errors and not missing:
                return
            if name in errors:
                problem = f"{name}({str(exc)!r}) does not name {missing}"
            else:
                problem = f"raised {name}({exc}) instead of {' or '.join(errors)}"
            advisory = contract == "bridge" and name in bridge_errors
            findings.append(Finding("contract", f"{what}: {problem}", check, binding=not advisory))
            return
        # Megatron-Bridge raises nothing for some of SPEC's errors (a router or
        # norm selected): silence is then its behaviour, advisory under bridge.
        silent_ok = contract == "bridge" and check in BRIDGE_SILENT
        findings.append(Finding("contract", f"{what}: no {' or '.join(errors)} raised", check, binding=not silent_ok))

    return expect


#: Contract points on which Megatron-Bridge raises no error at all (so a miss is advisory under bridge).
BRIDGE_SILENT = ("non_linear_target", "router_target")


# megatron-core's Transformer Engine linears (the harness's own list; its models use local specs).
_TE_LINEARS = frozenset({"TELinear", "TEColumnParallelLinear", "TERowParallelLinear", "TELayerNormColumnParallelLinear"})


def linear_type(module: torch.nn.Module) -> bool:
    """SPEC's linear types (plain, megatron column/row parallel, TE), decided by the harness from the class."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, (torch.nn.Linear, ColumnParallelLinear, RowParallelLinear)):
        return True
    return any(c.__name__ in _TE_LINEARS for c in type(module).__mro__)


def stage_local_findings(chunks: list[torch.nn.Module], view: torch.nn.Module, lora_kwargs: dict[str, Any]) -> list[Finding]:
    """At a pipeline layout: whether the adapted modules are the ones the patterns select by stage-local names
    (``decoder.layers.0`` on every stage) where that differs from what they select by the whole model's names
    (``view``: ``harness.pipeline.global_view``). SPEC "Pipeline stages": a layer index in a pattern is the
    model's layer. Decided by the harness's own matching (``harness.rules.vlm``), never the implementation's."""
    from harness.rules.adapters import adapter_modules
    from harness.rules.vlm import expected_adapted_modules

    wrappers = adapter_modules(view)
    local = {id(m): n for chunk in chunks for n, m in chunk.named_modules()}
    linear: dict[str, str] = {}
    for name, module in view.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue  # inside an adapter wrapper: its base and the adapter's own linears
        if (name in wrappers or linear_type(module)) and id(module) in local:
            linear[name] = local[id(module)]
    targets, excludes = list(lora_kwargs.get("target_modules") or []), list(lora_kwargs.get("exclude_modules") or [])
    if not targets and not excludes:
        return []
    whole = expected_adapted_modules(linear, targets, excludes)
    picked_locally = expected_adapted_modules(set(linear.values()), targets, excludes)
    by_local = {g for g, n in linear.items() if n in picked_locally}
    got = set(wrappers)
    if whole == by_local or got != by_local:
        return []
    return [Finding(
        "contract", f"target/exclude patterns {targets or excludes} were matched against this pipeline stage's local "
        f"names: adapted {sorted(got - whole)[:3]}, left {sorted(whole - got)[:3]}. megatron-core numbers each "
        "stage's layers from 0 (decoder.layers.0 on every stage); a layer index in a pattern names the whole "
        "model's layer (SPEC: Pipeline stages)", "stage_local_names")]


def stage_record(ctx: Any, tp_rank: int, tp: int, stages: list[dict[str, Any]], findings: list[Finding],
                 extras: Any) -> RankRecord:
    """A rank's record at a pipeline layout from every stage's evidence (``harness.pipeline.stage_gathered`` of
    dicts with ``output``, ``input_grad``, ``grads``, ``initial`` and ``partitions``): the last stage's output,
    the first's input gradient, the stages' adapters together by global name, as a PP=1 rank's record reads."""
    from megatron.core import parallel_state

    from harness.pipeline import merged

    return RankRecord(
        rank=ctx.rank,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        output=next((st["output"] for st in stages if st["output"] is not None), None),
        input_grad=next((st["input_grad"] for st in stages if st["input_grad"] is not None), None),
        adapter_grads=merged([st["grads"] for st in stages]) or {},
        initial_adapters=merged([st["initial"] for st in stages]) or {},
        partitions=merged([st["partitions"] for st in stages]) or {},
        findings=findings,
        extras=extras,
    )

