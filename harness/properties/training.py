"""training_matches and replicas_identical: LoRA inside megatron-core's own training loop.

Both read one run (``harness.tasks.training``): the implementation's adapted
model trained for the case's ``TrainingLoop`` under megatron-core's
``DistributedDataParallel``, ``finalize_model_grads`` and optimizer, every
data-parallel replica on its own data.

``training_matches`` compares it with the reference trained on the same
global batch with plain torch on one device: after every step the held-out
logits on every rank and the adapters put back together over TP equal the
reference's, and no base parameter moved (bit for bit). A gradient reduced
over the wrong group (expert adapters over dense DP where ETP != TP), a
replicated factor not summed over TP under sequence parallelism, a
micro-batch lost to accumulation or a gradient lost to a checkpointed block
moves a step away from the reference's.

``replicas_identical`` needs no reference: every adapter tensor is the same
bits on every rank that holds a replica of it (the data-parallel replicas,
the TP ranks of a factor each holds whole) after every step. Replicas
that drift apart train different models on different ranks.
"""

from __future__ import annotations

from typing import Any

from harness.compare import Tolerance, compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import compare_adapter_sets, layout_violations, no_adapter_reason, replicas
from harness.results import Check, Location


#: float64 after a few optimizer steps: the summation-order differences a single pass keeps below 1e-12
#: grow with every step (the first deep run on the final code saw 1e-8 relative in held-out logits after
#: three SGD steps of three micro-batches at moe tp2-ep2-etp1-dp2-sp, adapters within 1e-9). 1e-6 stays
#: 400x below the smallest error a wrong implementation in tests/wrong_impls makes here (4e-4).
TRAINED_FLOAT64 = Tolerance(rtol=1e-6, atol=1e-12)


def training_tolerance(dtype_name: str) -> Tolerance:
    """The bound for a trained model: ``TRAINED_FLOAT64``, or the forward comparison's float32 bound."""
    return TRAINED_FLOAT64 if dtype_name == "float64" else tolerance_for(None, dtype_name)


def _comparer(ev: Any, loop: Any, tol: Tolerance) -> Any:
    """(tensor, step, adapter name or None for the held-out logits) -> (stats, bound): a float64 loop against
    the reference at ``tol``; a float32 or bf16 loop by its error against the float64 loop on the same exact
    values, bounded by the single-device loop's in the same dtype (``compare_low_precision``, the 16-bit
    rule of every other comparison), float32 with the least bounds ``FLOAT32_FLOOR``: a fixed float32 bound
    cannot follow an example's conditioning (a deep run found a dense model whose held-out logits lose 3e-3
    of their float32 precision in three Adam steps, on every side alike)."""
    import torch

    from harness.compare import compare_low_precision

    reference = ev.training_reference

    def pick(record: Any, step: int, pname: Any) -> Any:
        at = record.extras.steps[step]
        return at.logits if pname is None else at.adapters.get(pname)

    if loop.dtype_name == "float64":
        return lambda actual, step, pname: (compare_tensors(actual, pick(reference, step, pname), tol), tol)
    exact = ev.training_exact
    eps = torch.finfo(loop.dtype).eps

    def moved(tensor: Any, start: Any) -> Any:
        return None if tensor is None or start is None else tensor - start

    float32 = loop.dtype_name == "float32"

    def compare(actual: Any, step: int, pname: Any) -> Any:
        if pname is None:
            if float32:
                return _floored(actual, pick(reference, step, None), pick(exact, step, None), eps, FLOAT32_FLOOR["logits"])
            return compare_low_precision(actual, pick(reference, step, None), pick(exact, step, None), eps)
        start = exact.extras.initial.get(pname)
        if float32:
            return _floored(moved(actual, start), moved(pick(reference, step, pname), start),
                            moved(pick(exact, step, pname), start), eps, FLOAT32_FLOOR[loop.optimizer])
        # The adapters (a bf16 loop's float32 main values), less where they started (the same values on
        # every side): what the steps added, so that the bound scales with the update, not with the weight,
        # which a bf16 step of lr 0.01 moves by less than its last bit.
        return compare_low_precision(moved(actual, start), moved(pick(reference, step, pname), start),
                                     moved(pick(exact, step, pname), start), eps)

    return compare


#: Least bounds of a float32 loop, relative to the largest float64 value compared (the 16-bit rule's
#: floor is 2 eps, 2.4e-7 in float32). A sharded run rounds partial sums the single-device run does not
#: have; where they cancel, that rounding is amplified past any multiple of the single-device error (a bf16
#: deep run saw 18 times its bound at tp2), so a float32 loop keeps these floors, still 500 to 1e5 times
#: below what the wrong implementations here do to an update (100-200% of it).
FLOAT32_FLOOR = {"logits": 1e-4, "sgd": 1e-3,
                 # Adam divides each element's step by its gradient's root mean square plus eps (1e-4): where
                 # an element's float64 gradient is zero or tiny and a sharded run leaves float32 rounding
                 # noise, it steps by lr x noise / eps, up to 2.5e-3 of the largest update in 36 float32
                 # examples of lora.megatron at tp2 and tp2-sp.
                 "adam": 5e-2}


def _floored(actual: Any, reference: Any, exact: Any, eps: float, floor_rel: float) -> Any:
    """The 16-bit rule's comparison with ``floor_rel`` x max|exact| as the least bound."""
    from harness.compare import compare_low_precision

    stats, tol = compare_low_precision(actual, reference, exact, eps)
    if stats.passed or exact is None or actual is None or tuple(actual.shape) != tuple(exact.shape):
        return stats, tol
    floor = floor_rel * float(exact.detach().double().abs().max()) if exact.numel() else 0.0
    if floor <= tol.atol:
        return stats, tol
    wider = Tolerance(rtol=0.0, atol=floor)
    out = compare_tensors(actual, exact, wider)
    out.baseline_abs = stats.baseline_abs
    if not out.passed and out.reason != "non-finite values":
        out.reason = f"{stats.reason}; and above the float32 loop's floor {floor:.3g} = {floor_rel:g} x max|float64|"
    return out, wider


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _loop_errors(result: Check, records: list[Any], loop: Any) -> bool:
    failed = False
    for rec in records:
        if rec.extras.error is not None:
            result.fail(f"rank {rec.rank}: training under megatron-core's DDP and optimizer ({loop.describe()}) raised "
                        f"{rec.extras.error}", kind="contract", check="training_runs")
            failed = True
    return failed


def check_training(ev: Any) -> Check:
    records = ev.training
    broken = layout_violations("training_matches", records)
    if broken is not None:
        return broken
    loop = ev.case.loop
    result = Check("training_matches")
    if _loop_errors(result, records, loop):
        return result
    reference = ev.training_reference
    tol = training_tolerance(loop.dtype_name)
    compare = _comparer(ev, loop, tol)
    for rec in records:
        if rec.extras.base_changed:
            result.fail(f"rank {rec.rank}: base parameters changed in training ({_shown(rec.extras.base_changed)}): "
                        "the base must stay frozen", kind="numeric", check="training_base_frozen")
    for step, want in enumerate(reference.extras.steps):
        after = f"after step {step + 1} of {loop.steps} ({loop.describe()})"
        for rec in records:
            stats, bound = compare(rec.extras.steps[step].logits, step, None)
            result.compare(Location(f"held-out logits {after}", None, (rec.rank,)), stats, bound, check="training_logits")
        for ranks, full in replicas(records, ev.layout, lambda rec, step=step: rec.extras.steps[step].adapters):
            if set(full) != set(want.adapters):
                compare_adapter_sets(result, f"adapter {after}", full, want.adapters, ranks, tol, sub="training_adapters")
                return result  # named once: the other replicas and steps would say the same
            for pname in sorted(full):
                stats, bound = compare(full[pname], step, pname)
                result.compare(Location(f"adapter {after}", pname, ranks), stats, bound, check="training_adapters")
    reason = no_adapter_reason(reference)
    if reason and not result.findings:
        result.nothing_to_check(reason)
    return result


def check_replicas(ev: Any) -> Check:
    records = ev.training
    broken = layout_violations("replicas_identical", records)
    if broken is not None:
        return broken
    loop = ev.case.loop
    result = Check("replicas_identical")
    if _loop_errors(result, records, loop):
        return result
    shared = 0
    for step in range(loop.steps):
        holders: dict[str, list[tuple[int, Any]]] = {}
        for rec in records:
            for key, tensor in rec.extras.steps[step].replicas.items():
                holders.setdefault(key, []).append((rec.rank, tensor))
        drifted = False
        for key in sorted(holders):
            held = holders[key]
            if len(held) < 2:
                continue
            shared += 1
            (first_rank, first), rest = held[0], held[1:]
            differ = [rank for rank, t in rest if t.shape != first.shape or not bool((t == first).all())]
            if differ:
                drifted = True
                name = key.partition(":")[2].rsplit("@", 1)[0]
                other = dict(rest)[differ[0]]
                stats = compare_tensors(other, first, tolerance_for(None, loop.dtype_name)) if other.shape == first.shape else None
                how = f" (max|diff| {stats.max_abs:.3g})" if stats is not None else ""
                result.fail(f"{name} after step {step + 1} of {loop.steps} ({loop.describe()}): rank {first_rank} and "
                            f"rank(s) {differ} hold replicas of it that differ{how}: the replicas drifted apart",
                            kind="numeric", check="replicas_bitwise")
        if drifted:
            break  # the first step at which they part is the one to show
    if shared == 0 and not result.findings:
        result.nothing_to_check("no adapter tensor is held by more than one rank at this layout (no replica to compare)")
    return result


def _applies(layout: Any, capabilities: Any) -> Any:
    return None


def _applies_replicas(layout: Any, capabilities: Any) -> Any:
    world = layout.min_world_size
    if layout.dp(world) == 1 and layout.expert_dp(world) == 1:
        return ("no data-parallel replicas at this layout (DP=1, expert DP=1): every adapter tensor has one holder "
                "per TP rank")
    return None


_DESIGN = ("optimizer", "distributed_optimizer", "overlap_grad_reduce", "recompute", "per_token_loss")
#: bf16 loops exist in the families that train below float64 (harness.training.FLOAT64_ONLY).
_DENSE_DESIGN = _DESIGN + ("bf16",)
#: MoE: which parameters train decides which of megatron DDP's buffers and groups reduce them
#: (dense adapters over data parallelism, routed-expert adapters over expert data parallelism,
#: a shared expert's as dense), so the targets level and the shared expert are designed too:
#: with routed experts alone (the plainest targets) a dense adapter reduced over the expert
#: group trains wrong unseen.
_MOE_DESIGN = _DESIGN + ("expert_kind", "share_expert_adapters", "targets", "shared_experts")

TRAINING = register(Property(
    pipeline=("gpt", "moe"),
    name="training_matches",
    check=check_training,
    needs=("training", "training_reference"),
    families=("gpt", "moe"),
    doc="under megatron-core's DDP, finalize_model_grads and optimizer (Adam/SGD, distributed optimizer, overlapped "
    "reduction, buckets, recompute), different data per replica, after every step the held-out logits and the "
    "gathered adapters equal the reference's trained with plain torch on the same global batch; the base never moves",
    applies=_applies,
    example_share=0.2,
    design_factors={"gpt": _DENSE_DESIGN, "moe": _MOE_DESIGN},
))

REPLICAS = register(Property(
    pipeline=("gpt", "moe"),
    name="replicas_identical",
    check=check_replicas,
    needs=("training",),
    families=("gpt", "moe"),
    doc="after training under megatron-core's DDP and optimizer, every adapter tensor is bitwise the same on every "
    "rank holding a replica of it (data-parallel replicas, TP ranks of a factor held whole)",
    applies=_applies_replicas,
    example_share=0.2,
    design_factors={"gpt": _DENSE_DESIGN, "moe": _MOE_DESIGN},
))
