"""dropout_follows_spec: dropout acts on the adapter branch in training only, and replicated tensors drop alike.

The numeric side of dropout is in forward_matches / backward_matches: every
run uses ``harness.dropout``'s value-keyed masks, so a sharded adapter that
drops its input (``pre``) or output (``post``) computes exactly what the
single-device reference computes with the same mask, and one that drops
the base path or the wrong tensor differs. This property checks what an
equality with the reference cannot show on its own:

* with ``dropout > 0`` in training, dropout does drop (some element is
  zeroed on some rank);
* in eval mode (``training=False``) no dropout call drops anything, at every
  probability (SPEC: dropout acts only in training);
* with the implementation's own random dropout, a tensor that is the same
  on every TP rank (a column base's input without sequence parallelism, a
  row base's gathered output) gets the same mask on every TP rank; otherwise
  the sharded result is no single-device dropout at all.
"""

from __future__ import annotations

from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import Check


def check(ev) -> Check:
    broken = layout_violations("dropout_follows_spec", ev.impl)
    if broken is not None:
        return broken
    case = ev.case
    p = case.lora.get("dropout", 0.0)
    result = Check("dropout_follows_spec")
    stats = [rec.extras.get("dropout", {}) for rec in ev.impl]
    if case.training and p > 0 and not any(s.get("dropped", 0) for s in stats):
        calls = sum(s.get("calls", 0) for s in stats)
        result.fail(f"dropout={p} in training dropped nothing on any rank ({calls} dropping calls): "
                    "SPEC: the adapter branch drops in training", kind="contract", check="dropout_drops")
    if not case.training:
        for rec, s in zip(ev.impl, stats):
            if s.get("eval_calls"):
                result.fail(f"rank {rec.rank}: {s['eval_calls']} dropout call(s) with training=True while the model is "
                            f"in eval mode (dropout={p}): SPEC: dropout acts only in training",
                            kind="contract", check="dropout_eval_identity")
    for rec in ev.impl:
        for wrong in rec.extras.get("dropout_masks", []):
            result.fail(f"rank {rec.rank}: {wrong}", kind="contract", check="dropout_replicated_mask")
    return result


PROPERTY = register(Property(
    name="dropout_follows_spec",
    check=check,
    needs=("impl",),
    families=("gpt", "moe"),
    kind="contract",
    doc="dropout > 0 drops in training; eval mode never drops; a tensor replicated over TP gets the same mask on "
    "every TP rank (the value-keyed masks make forward/backward compare training-mode dropout exactly)",
))
