"""dropout_follows_spec: dropout acts on the adapter branch in training only, and replicated tensors drop alike.

The numeric side of dropout is in forward_matches / backward_matches: every
run uses ``harness.dropout``'s value-keyed masks, so a sharded adapter that
drops its input (``pre``) or output (``post``) computes exactly what the
single-device reference computes with the same mask, and one that drops
the base path or the wrong tensor differs. This property checks what an
equality with the reference cannot show on its own:

* with ``dropout > 0`` in training, dropout does drop (some element is
  zeroed on some rank). Decided only where it can be without a false
  alarm: the reference (same value-keyed masks) must have dropped
  something, and a correct implementation, whose adapters see the
  reference's ``n`` elements, drops nothing with probability
  ``(1 - p) ** n``, which must be at most ``harness.results.FALSE_ALARM``
  (1e-6; ``n >= 132`` at p = 0.1). Otherwise the check is undecidable on
  that example, and vacuous where the reference made no dropout call (no
  adapter drops);
* in eval mode (``training=False``) no dropout call drops anything, at every
  probability (SPEC: dropout acts only in training);
* with the implementation's own random dropout, a tensor that is the same
  on every TP rank (a column base's input without sequence parallelism, a
  row base's gathered output) gets the same mask on every TP rank; otherwise
  the sharded result is no single-device dropout at all.
"""

from __future__ import annotations

from harness.evidence import DenseExtras
from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import FALSE_ALARM, Check


def drop_nothing_probability(p: float, elements: int) -> float:
    """The chance that inverted dropout with probability ``p`` keeps every one of ``elements`` elements.

    A correct implementation drops the elements the reference drops (the
    masks are value-keyed, ``harness.dropout``); a keep decision is a hash
    of each value, so over the draws it behaves as an independent coin with
    P(keep) = 1 - p. This is the chance that a correct implementation drops
    nothing on an example whose adapters see ``elements`` values in dropping
    calls, i.e. the false-alarm rate of "it dropped nothing: a defect".
    """
    if elements <= 0 or p <= 0.0:
        return 1.0
    return (1.0 - p) ** elements


def check(ev) -> Check:
    broken = layout_violations("dropout_follows_spec", ev.impl)
    if broken is not None:
        return broken
    case = ev.case
    p = case.lora.get("dropout", 0.0)
    result = Check("dropout_follows_spec")
    stats = [rec.extras.dropout for rec in ev.impl]
    decided = False
    if case.training and p > 0:
        decided |= _check_drops(result, ev, p, stats)
    if not case.training and p > 0:
        decided = True
        for rec, s in zip(ev.impl, stats):
            if s.eval_calls:
                result.fail(f"rank {rec.rank}: {s.eval_calls} dropout call(s) with training=True while the model is "
                            f"in eval mode (dropout={p}): SPEC: dropout acts only in training",
                            kind="contract", check="dropout_eval_identity")
    # Only the dense task checks replicated masks (None: not checked on this example).
    masks = [rec.extras.dropout_masks if isinstance(rec.extras, DenseExtras) else None for rec in ev.impl]
    if any(m is not None for m in masks):
        decided = True
    for rec, wrong_masks in zip(ev.impl, masks):
        for wrong in wrong_masks if wrong_masks is not None else ():
            result.fail(f"rank {rec.rank}: {wrong}", kind="contract", check="dropout_replicated_mask")
    if not decided and not result.findings:
        reasons = "; ".join(n.message for n in result.notes) or (
            f"training with dropout={p} and nothing that a single rank's mask could show" if case.training
            else "nothing to check")
        result.nothing_to_check(reasons)
    return result


def _check_drops(result: Check, ev, p: float, stats: list) -> bool:
    """SPEC: dropout > 0 in training drops. Decided only where a correct implementation would drop
    something with probability >= 1 - FALSE_ALARM; returns whether it was decided."""
    ref = ev.reference.extras.dropout
    ref_calls, ref_elements, ref_dropped = ref.calls, ref.elements, ref.dropped
    if ref_calls == 0:
        result.note("dropout_drops", "vacuous",
                    f"dropout={p} in training, but the reference made no dropout call on this example (no module "
                    "the patterns select has an adapter that drops)")
        return False
    miss = drop_nothing_probability(p, ref_elements)
    if ref_dropped == 0 or miss > FALSE_ALARM:
        why = ("the reference itself dropped none of them" if ref_dropped == 0
               else f"too few for a verdict at a false-alarm rate of {FALSE_ALARM:g}")
        result.note("dropout_drops", "undecidable",
                    f"dropout={p}: the reference's adapters saw {ref_elements} element(s) in {ref_calls} dropping "
                    f"call(s), {why}", p_false_alarm=miss)
        return False
    if not any(s.dropped for s in stats):
        calls = sum(s.calls for s in stats)
        result.fail(f"dropout={p} in training dropped nothing on any rank ({calls} dropping calls; the reference "
                    f"dropped {ref_dropped} of {ref_elements} elements with the same value-keyed masks, and a correct "
                    f"implementation drops nothing with probability {miss:.2g}): SPEC: the adapter branch drops "
                    "in training", kind="contract", check="dropout_drops")
    return True


PROPERTY = register(Property(
    pipeline=True,
    name="dropout_follows_spec",
    check=check,
    needs=("impl", "reference"),
    families=("gpt", "moe"),
    kind="contract",
    doc="dropout > 0 drops in training; eval mode never drops; a tensor replicated over TP gets the same mask on "
    "every TP rank (the value-keyed masks make forward/backward compare training-mode dropout exactly)",
))
