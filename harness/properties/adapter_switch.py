"""adapters_switch_off: switched off, the adapted model computes the base model; switched on again, the adapted one.

Checked on every rank against the same rank's model before the LoRA was
applied (``harness.tasks.switch``), without the reference: inside
``lora.disable_adapter(model)`` and after ``disable_adapter_layers(model)``
the logits equal the base model's; after the block, after
``enable_adapter_layers(model)`` and after a ``disable_adapter`` block whose
body raised they equal the adapted model's again; no parameter value,
``requires_grad`` flag or module changed. An example whose adapters do not
move the logits beyond the tolerance (nothing adapted) cannot tell on from
off: it is reported as having nothing to check, never as a pass of the check.
"""

from __future__ import annotations

from harness.compare import Tolerance, compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import Check, Location
from harness.tasks.switch import STEPS


def check(ev) -> Check:
    records = ev.switch
    broken = layout_violations("adapters_switch_off", records)
    if broken is not None:
        return broken
    case = ev.case
    off_tol = tolerance_for(None, case.model_dtype)  # switched off, nothing of the adapter's dtype runs
    on_tol = tolerance_for(case.lora_dtype, case.model_dtype)
    result = Check("adapters_switch_off")
    for rec in records:
        sw = rec.extras
        if sw.missing:
            if rec.rank == 0:
                result.fail(f"the LoRA object has no {', '.join(sw.missing)} (harness/SPEC.md, 'Switching adapters off'; "
                            "an implementation without them declares adapter_switch: False)",
                            kind="contract", check="switch_api")
            continue
        if sw.error is not None:
            result.fail(f"rank {rec.rank}: switching the adapters raised at step {sw.error}", kind="contract",
                        check="switch_runs")
            continue
        if sw.changed:
            shown = ", ".join(sw.changed[:5]) + (f" and {len(sw.changed) - 5} more" if len(sw.changed) > 5 else "")
            result.fail(f"rank {rec.rank}: switching the adapters off and on changed the value or requires_grad of {shown}",
                        kind="contract", check="switch_keeps_parameters")
        if sw.tree_changed:
            result.fail(f"rank {rec.rank}: switching the adapters off and on changed the module tree",
                        kind="contract", check="switch_keeps_modules")
        wide = Tolerance(rtol=2 * max(off_tol.rtol, on_tol.rtol), atol=2 * max(off_tol.atol, on_tol.atol))
        apart = compare_tensors(sw.adapted, sw.base, wide)
        if apart.passed:
            if rec.rank == 0:
                result.nothing_to_check(
                    "the adapters do not move the logits beyond the tolerance (nothing adapted on this example): "
                    "on cannot be told from off")
            continue
        for step, (what, on) in STEPS.items():
            want, tol = (sw.adapted, on_tol) if on else (sw.base, off_tol)
            where = Location(f"{what}, against the {'adapted' if on else 'base'} model's", None, (rec.rank,))
            result.compare(where, compare_tensors(sw.steps[step], want, tol), tol, check="switch_on" if on else "switch_off")
    return result


def _applies(layout, capabilities):
    if not capabilities.adapter_switch:
        return "the implementation does not declare switching adapters off (adapter_switch)"
    return None


PROPERTY = register(Property(
    pipeline=("gpt", "moe"),
    name="adapters_switch_off",
    check=check,
    needs=("switch",),
    families=("gpt", "moe"),
    doc="inside disable_adapter(model) and after disable_adapter_layers the logits equal the base model's; after the "
    "block, enable_adapter_layers and a raising block, the adapted model's; no parameter or module changes",
    applies=_applies,
    design_factors={
        "gpt": ("targets", "model_dtype", "gated", "bias", "query_groups"),
        "moe": ("targets", "expert_kind", "share_expert_adapters", "shared_experts", "dispatcher", "gated"),
    },
))
