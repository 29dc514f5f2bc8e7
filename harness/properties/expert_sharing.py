"""shared_expert_adapters_identical: a grouped linear's shared adapter is bitwise the same on every EP rank.

SPEC (Experts): with ``share_expert_adapters`` one adapter serves every
expert of a grouped linear, identical on every EP rank: broadcast at
creation, gradients summed over the EP group. The MoE task sends each
rank's raw local shards right after ``LoRA(...)(model)`` and after one SGD
step (on gradients reduced over expert data parallelism as an optimizer
would); ranks holding the same expert-TP shard must agree bit for bit both
times. A shared adapter initialised per EP rank, or whose gradient is not
summed over EP, drifts apart here even where the outputs still look right.
"""

from __future__ import annotations

import torch

from harness.properties import Property, register
from harness.properties._gather import layout_violations
from harness.results import Check



def check(ev) -> Check:
    broken = layout_violations("shared_expert_adapters_identical", ev.impl)
    if broken is not None:
        return broken
    result = Check("shared_expert_adapters_identical")
    records = ev.impl
    for moment, stepped in (("after creation", False), ("after one optimizer step", True)):
        by_shard: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
        for rec in records:
            shards = rec.extras.shared_stepped if stepped else rec.extras.shared_created
            if shards is None:  # no optimizer step in inference
                continue
            for pname, t in shards.items():
                by_shard.setdefault((rec.extras.etp_rank, pname), []).append((rec.rank, t))
        for (etp_rank, pname), held in sorted(by_shard.items()):
            first_rank, first = held[0]
            for rank, t in held[1:]:
                if t.shape != first.shape or not torch.equal(t, first):
                    diff = (t.double() - first.double()).abs().max().item() if t.shape == first.shape else float("nan")
                    result.fail(
                        f"shared expert adapter {pname} (ETP rank {etp_rank}) differs {moment}: rank {rank} vs "
                        f"rank {first_rank}, max |diff| {diff:.3g} (SPEC: identical on every EP rank)",
                        check="shared_identical",
                    )
                    break
    return result


def _applies(layout, capabilities):
    if not capabilities.experts:
        return "the implementation does not declare expert support"
    return "EP=1: a single EP rank holds every shared adapter" if layout.ep == 1 else None


PROPERTY = register(Property(
    pipeline=("moe",),
    name="shared_expert_adapters_identical",
    check=check,
    needs=("impl",),
    families=("moe",),
    kind="numeric",
    doc="with share_expert_adapters, a grouped linear's adapter is bitwise identical on every EP rank "
    "after creation and after one optimizer step",
    applies=_applies,
))
