"""ep_size_independent: an MoE model's outputs do not depend on the expert-parallel size.

The same case at the same TP, ETP and SP with EP=1 is the comparison: the
logits after one SGD step on the harness's adapter values (so the expert
gradients' reduction over EP and expert data parallelism is in play), and,
where every routed-expert adapter is shared (grouped experts with
``share_expert_adapters``), the logits with the implementation's *own*
initial adapters, which SPEC requires to be the same on every EP rank.
"""

from __future__ import annotations

from harness.compare import compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import compare_or_undecidable, fragile_dropout, layout_violations
from harness.results import Check, Location



def check(ev) -> Check:
    broken = layout_violations("ep_size_independent", ev.impl + ev.impl_ep1)
    if broken is not None:
        return broken
    case = ev.case
    tol = tolerance_for(case.lora_dtype, case.model_dtype)
    result = Check("ep_size_independent")
    base = ev.impl_ep1[0]
    shared = case.shape.grouped and case.lora.get("share_expert_adapters", True)
    # Both runs drop with keyed masks: an element at a cell boundary makes a difference undecidable.
    fragile = fragile_dropout(ev.impl, ev.impl_ep1) if case.training else 0
    for rec in ev.impl:
        if shared:
            compare_or_undecidable(result, Location("output with own initial adapters", None, (rec.rank,)),
                                   compare_tensors(rec.extras.own_output, base.extras.own_output, tol), tol, fragile)
        if case.training:
            compare_or_undecidable(result, Location("output after one optimizer step", None, (rec.rank,)),
                                   compare_tensors(rec.extras.stepped_output, base.extras.stepped_output, tol), tol, fragile)
    return result


def _applies(layout, capabilities):
    if not capabilities.experts:
        return "the implementation does not declare expert support"
    return "EP=1 is the comparison itself" if layout.ep == 1 else None


PROPERTY = register(Property(
    pipeline=("moe",),
    name="ep_size_independent",
    check=check,
    needs=("impl", "impl_ep1"),
    families=("moe",),
    doc="outputs after an optimizer step (and, with shared expert adapters, with the implementation's own "
    "initial adapters) equal those at EP=1",
    applies=_applies,
))
