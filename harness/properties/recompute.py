"""recompute_transparent: activation recompute changes no adapter gradient and no logit.

Checked on every rank against the same rank's run without recompute
(``harness.tasks.recompute``), without the reference: for each recompute
setting of the family (``full`` with ``uniform`` over every layer;
``selective`` over the MLP or MoE layer and core attention; ``block``
recompute runs in the training loop's designed examples), the training
logits and every
trainable parameter's gradient equal the run without recompute's. A
gradient missing or zero under recompute where the run without has one is
named as such: megatron's reentrant checkpoint never ran its backward,
because nothing entering it required grad (a frozen base at pipeline size
1). An example on which no trainable parameter has a non-zero gradient
without recompute has nothing to check. With dropout on, the recomputed
forward must draw the masks its forward drew (megatron's checkpoint restores
the RNG states first); an implementation whose draws depend on anything
else (a nested RNG-tracker fork rewinds torch's default stream on exit under
recompute, not in forward) trains with other masks than its forward used.
A setting megatron-core itself cannot run for the example's model (selective
MLP recompute of a biased MLP: its checkpoint backward re-enters itself, with
no LoRA at all) is left out and noted as not decidable there.
"""

from __future__ import annotations

from harness.compare import compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import Check, Location


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check(ev) -> Check:
    records = ev.recompute
    broken = layout_violations("recompute_transparent", records)
    if broken is not None:
        return broken
    case = ev.case
    tol = tolerance_for(case.lora_dtype, case.model_dtype)
    result = Check("recompute_transparent")
    live = 0
    for setting, why in (records[0].extras.left_out if records else {}).items():
        result.note(f"recompute ({setting})", "vacuous", why)
    for rec in records:
        rc = rec.extras
        if rc.plain.error is not None:
            result.fail(f"rank {rec.rank}: training without recompute raised {rc.plain.error}", kind="contract",
                        check="recompute_runs")
            continue
        moving = sorted(n for n, g in rc.plain.grads.items() if g is not None and bool(g.ne(0).any()))
        live += len(moving)
        for setting, run in rc.runs.items():
            if run.error is not None:
                result.fail(f"rank {rec.rank}: training under recompute ({setting}) raised {run.error}",
                            kind="numeric", check="recompute_runs")
                continue
            result.compare(Location(f"training logits under recompute ({setting}), against the run without's", None,
                                    (rec.rank,)), compare_tensors(run.logits, rc.plain.logits, tol), tol,
                           check="recompute_logits")
            lost = [n for n in moving if run.grads.get(n) is None or not bool(run.grads[n].ne(0).any())]
            if lost:
                result.fail(f"rank {rec.rank}: under recompute ({setting}) {_shown(lost)} got no gradient (none or all "
                            f"zero) where the run without recompute has one: the checkpointed region's backward never "
                            f"ran for them", kind="numeric", check="recompute_gradient_lost")
            for name in sorted(set(rc.plain.grads) | set(run.grads)):
                if name in lost:
                    continue
                if name not in run.grads or name not in rc.plain.grads:
                    result.fail(f"rank {rec.rank}: {name} is trainable in only one of the runs with and without "
                                f"recompute ({setting})", kind="contract", check="recompute_same_parameters")
                    continue
                want, got = rc.plain.grads[name], run.grads[name]
                if want is None and got is None:
                    continue
                result.compare(Location(f"gradient under recompute ({setting}), against the run without's", name,
                                        (rec.rank,)), compare_tensors(got, want, tol), tol, check="recompute_gradient")
    if live == 0 and not result.findings:
        result.nothing_to_check("no trainable parameter has a non-zero gradient without recompute (nothing adapted "
                                "on this example)")
    return result


def _applies(layout, capabilities):
    if not capabilities.recompute:
        return "the implementation does not declare training under activation recompute (recompute)"
    return None


PROPERTY = register(Property(
    pipeline=("gpt", "moe"),
    name="recompute_transparent",
    check=check,
    needs=("recompute",),
    families=("gpt", "moe"),
    doc="under each activation recompute setting (full uniform, selective) the training logits and every "
    "adapter gradient equal the run without recompute's; none is lost to a checkpoint whose inputs need no grad",
    applies=_applies,
    # An example trains three models (without recompute and two settings): a fifth of the draws.
    example_share=0.2,
    design_factors={
        "gpt": ("targets", "gated"),
        # Dropout: expert adapters draw from torch's default stream after the dense adapters' draws
        # in the same recomputed layer (the first deep run's failures, tests/wrong_impls/recompute_nested_fork.py).
        "moe": ("targets", "expert_kind", "shared_experts", "dropout"),
    },
))
