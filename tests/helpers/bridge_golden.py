"""The golden table of what the harness finds in Megatron-Bridge's LoRA: how it is made, how it is compared.

``run_matrix()`` runs every registered property at every layout of
``--tp 2 --ep 2 --pp 2`` for ``megatron.bridge.peft.lora`` with a fixed seed and
``EXAMPLES`` examples per cell, and returns each cell that did not simply
pass: its verdict and the finding checks behind it. ``tests/helpers/bridge_golden.json``
holds that table for the installed Megatron-Bridge version, each row with
what it is (the upstream issue, or the SPEC point Bridge is looser on);
``tests/bridge/test_bridge_golden.py`` compares a fresh run with it, and
``python -m tests.helpers.bridge_golden --write`` rewrites it after a deliberate
change (say why in the commit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BRIDGE = "megatron.bridge.peft.lora"
GOLDEN = Path(__file__).with_name("bridge_golden.json")
SEED = 20261206
EXAMPLES = 2  # per cell: the table is about which cells show what, not about search depth
#: Properties left out of the table, with why: their verdict on Bridge is not reproducible run to run.
#: Bridge's recompute patch remembers models by id(), so whether a rank's fresh model is patched depends
#: on where the allocator put it: the same cell passes, fails numerically, or hangs (ranks that disagree
#: do not pair up backward's collectives). The README lists what it finds there and how to replay it.
NOT_IN_TABLE = {
    "recompute_transparent": "Bridge's verdict depends on id() reuse (see above)",
    # The training loop draws activation recompute too, with the same id()-dependent patch; run by hand
    # (README, "Training loop"), Bridge passed both at tp2 and tp2-ep2-etp2-sp.
    "training_matches": "the training loop draws activation recompute: Bridge's verdict depends on id() reuse",
    "replicas_identical": "the training loop draws activation recompute: Bridge's verdict depends on id() reuse",
    "checkpoint_roundtrip": "added after Megatron-Bridge 0.6.2's table was recorded; not yet run against it",
}

#: What a finding check means when Megatron-Bridge 0.6.2 produces it (the table's "why" column).
EXPLAINED = {
    "numeric": "Megatron-Bridge #5634 (fixed by #5635): expert linear_fc2 adapters at expert-TP > 1 sum each rank's "
               "partial delta again (A's output is left unreduced for expert layers), so logits, gradients and the "
               "fold are wrong",
    "adapted_set": "peft/utils.py wildcard_match turns '*' into '(.*)' and escapes nothing, so a pattern's '.' matches "
                   "any character ('*.experts.*linear_fc1' also selects shared_experts.linear_fc1); no upstream report known",
    "idempotent": "SPEC stricter (advisory): a second application re-adapts the adapters' own linears in exclude mode",
    "merge_model_fold": "SPEC stricter (advisory): LoRAMerge is a tensor helper, not a model transform",
    "merge_cast_once": "SPEC stricter (advisory): merges in the weights' dtype (16-bit rounds twice)",
    "unmatched_warns": "SPEC stricter (advisory): a pattern matching nothing is only logged",
    "non_linear_target": "SPEC stricter (advisory): NotImplementedError/AttributeError instead of TypeError",
    "router_target": "SPEC stricter (advisory): the router is adapted (LoRATopKRouter)",
    "both_modes": "SPEC stricter (advisory): AssertionError",
    "unknown_init": "SPEC stricter (advisory): NotImplementedError",
    "rank_divisible": "SPEC stricter (advisory): AssertionError",
    "init_tp_independent": "SPEC stricter (advisory): init fans computed on the shard (Megatron-Bridge #5840)",
    "init_distribution": "SPEC stricter (advisory): init fans computed on the shard (Megatron-Bridge #5840)",
    "vlm_access_forms": "SPEC stricter (advisory): VLMLoRA takes the model as a list of chunks only",
}

#: A numeric cell whose minimal case runs megatron's shared-expert overlap without expert tensor parallelism.
SHARED_OVERLAP = ("Megatron-Bridge #6089: under moe_shared_expert_overlap the shared expert's fc2 adapter adds its "
                  "whole, already reduced delta on every TP rank, and the MoE layer's reduction sums it TP times")


def _why(check: str, layout: Any, minimal: Any) -> str:
    """What a finding check means in this cell (the table's "why" column)."""
    if layout.pp > 1 and check in EXPLAINED_AT_PP:
        return EXPLAINED_AT_PP[check]
    shape = (minimal or {}).get("shape") or {}
    if check == "numeric" and shape.get("shared_expert_overlap") and layout.etp_size == 1:
        return SHARED_OVERLAP
    return EXPLAINED.get(check, "unexplained: look into it")


#: The same at pipeline layouts, where Bridge's matcher sees a stage's local names (peft/base.py walks each
#: chunk from its root): a pattern with a layer index selects that layer of every stage.
STAGE_LOCAL = ("Megatron-Bridge matches patterns against a pipeline stage's local names: '*.layers.0.*' adapts "
               "the first layer of every stage (SPEC 'Pipeline stages'); no upstream report known")
EXPLAINED_AT_PP = {"numeric": STAGE_LOCAL, "adapted_set": STAGE_LOCAL, "stage_local_names": STAGE_LOCAL}


def _checks(outcome: Any) -> list[str]:
    from harness.results import Verdict

    found = set()
    for record in outcome.records:
        for f in record.findings:
            if f.verdict.failing or f.verdict is Verdict.ADVISORY:
                found.add(f.check or f.kind)
        if record.verdict in (Verdict.CRASH, Verdict.HANG):
            found.add(record.verdict.value)
    return sorted(found)


def run_matrix() -> list[dict[str, Any]]:
    """The non-pass cells of Megatron-Bridge's run, in the run's order."""
    from hypothesis import settings

    from harness.contract import capabilities_of
    from harness.driver import check_property
    from harness.plan import layout_seed
    from harness.properties import registry
    from harness.results import Verdict
    from harness.runs import Executor
    from harness.families import family_names
    from harness.settings import layout_set

    caps = capabilities_of(BRIDGE)
    executor = Executor()
    rows = []
    for family in family_names():
        for layout in layout_set(2, 2, family, max_pp=2):
            for name, prop in registry().items():
                if family not in prop.families or name in NOT_IN_TABLE:
                    continue
                outcome = check_property(
                    prop, layout, BRIDGE, settings=settings(max_examples=EXAMPLES, database=None, deadline=None),
                    executor=executor, capabilities=caps, seed=layout_seed(SEED, layout, family), family=family,
                    shrink_budget=4, designed=False)
                if outcome.verdict in (Verdict.PASS, Verdict.SKIPPED, Verdict.VACUOUS):
                    continue
                checks = _checks(outcome)
                minimal = (None if outcome.minimal_case is None or outcome.verdict is Verdict.ADVISORY
                           else outcome.minimal_case.to_json())
                rows.append({
                    "property": name, "layout": outcome.layout, "verdict": outcome.verdict.value, "checks": checks,
                    "why": sorted({_why(c, layout, minimal) for c in checks}), "minimal_case": minimal,
                })
    return rows


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What a fresh run must reproduce exactly: the cell and its verdict. The finding checks behind
    it depend on how far shrinking went (each must still be one the table explains)."""
    return (row["property"], row["layout"], row["verdict"])


def main(argv: list[str]) -> int:
    from harness.bridge import bridge_version
    from harness.pool import shutdown_all

    try:
        rows = run_matrix()
    finally:
        shutdown_all()
    table = {"megatron_bridge": bridge_version(), "seed": SEED, "examples_per_cell": EXAMPLES, "cells": rows}
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(rows)} cells)")
    else:
        print(json.dumps(table, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
