"""adapters_follow_spec: trainable set, mode, adapter dtype, logits dtype and idempotence, on every rank."""

from __future__ import annotations

from harness.properties import Property, register
from harness.properties._gather import rank_findings
from harness.results import Check


def check(ev) -> Check:
    return rank_findings("adapters_follow_spec", ev.impl)


PROPERTY = register(Property(
    pipeline=True,
    families=("gpt", "moe"),
    name="adapters_follow_spec",
    check=check,
    needs=("impl",),
    kind="contract",
    doc="training: base frozen, adapters trainable, train mode; training=False: everything frozen, eval mode; "
    "adapters in lora_dtype, logits in the model's dtype, applying the LoRA twice changes nothing",
))
