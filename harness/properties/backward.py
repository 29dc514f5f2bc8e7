"""backward_matches: the input gradient on every rank and every adapter gradient equal the reference's.

Adapter gradients are put back together from their shards per
data-parallel replica (every replica must hold the same). In inference
(``training=False``) every parameter is frozen, so only the input gradient
is compared.
"""

from __future__ import annotations

from harness.compare import compare_tensors, tolerance_for
from harness.properties import Property, register
from harness.properties._gather import compare_adapter_sets, replicas, layout_violations
from harness.results import Check, Location



def check(ev) -> Check:
    broken = layout_violations("backward_matches", ev.impl)
    if broken is not None:
        return broken
    case = ev.case
    tol = tolerance_for(case.lora_dtype, case.model_dtype)
    result = Check("backward_matches")
    ref, records = ev.reference, ev.impl
    for rec in records:
        result.compare(Location("input_grad", None, (rec.rank,)), compare_tensors(rec.input_grad, ref.input_grad, tol), tol)
    if case.training:
        for ranks, grads in replicas(records, case.layout, "adapter_grads"):
            compare_adapter_sets(result, "gradient", grads, ref.adapter_grads, ranks, tol)
    return result


PROPERTY = register(Property(
    families=("gpt", "moe"),
    name="backward_matches",
    check=check,
    needs=("impl", "reference"),
    doc="input gradient on every rank and every adapter gradient (gathered per data-parallel replica) equal the reference",
))
