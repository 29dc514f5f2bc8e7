"""backward_matches: the input gradient on every rank and every adapter gradient equal the reference's.

Adapter gradients are put back together from their shards per
data-parallel replica (every replica must hold the same). In inference
(``training=False``) every parameter is frozen, so only the input gradient
is compared. Gradients are those of ``case.micro_batches`` forward/backward
passes, which must accumulate; after them, one ``torch.optim.SGD`` step
(lr 0.1) must leave the gathered adapters equal to the reference's.
"""

from __future__ import annotations

from harness.evidence import DenseExtras, evidence_path
from harness.properties import Property, register
from harness.properties._gather import Numeric, layout_violations, no_adapter_reason, replicas
from harness.results import Check, Location

#: The dense task's adapters after one SGD step (the MoE task compares its stepped logits in ep_size_independent).
STEPPED = evidence_path(DenseExtras, "stepped_adapters")


def check(ev) -> Check:
    broken = layout_violations("backward_matches", ev.impl)
    if broken is not None:
        return broken
    case = ev.case
    result = Check("backward_matches")
    result.vacuous = no_adapter_reason(ev.reference)
    numeric = Numeric(ev)
    records = ev.impl
    for rec in records:
        numeric.compare(result, Location("input_grad", None, (rec.rank,)), rec.input_grad, lambda r: r.input_grad)
    if case.training:
        for ranks, grads in replicas(records, case.layout, "adapter_grads"):
            numeric.compare_sets(result, "gradient", grads, "adapter_grads", ranks)
        _note_unrouted_experts(result, ev.reference)
        ref = ev.reference.extras
        if isinstance(ref, DenseExtras) and ref.stepped_adapters is not None:
            for ranks, stepped in replicas(records, case.layout, STEPPED):
                numeric.compare_sets(result, "value after one SGD step", stepped, STEPPED, ranks)
    return result


def _note_unrouted_experts(result: Check, reference) -> None:
    """Expert adapters whose reference gradient is exactly zero saw no token on this example:
    their gradient comparison held trivially, which the record says rather than counts."""
    import torch

    idle = sorted(p for p, g in (reference.adapter_grads or {}).items()
                  if ".experts." in p and g is not None and not torch.count_nonzero(g))
    if idle:
        result.note("expert_gradients", "vacuous",
                    f"{len(idle)} expert adapter parameter(s) got no gradient in the reference (no token routed "
                    f"through them on this example), e.g. {idle[0]}: compared, but nothing was checked there")


PROPERTY = register(Property(
    pipeline=True,
    families=("gpt", "moe"),
    name="backward_matches",
    check=check,
    needs=("impl", "reference"),
    doc="input gradient on every rank and every adapter gradient (gathered per data-parallel replica) equal the reference",
))
