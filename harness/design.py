"""Designed examples: a covering array of the contract's code paths, run at every layout before random draws.

Random draws find what nobody thought of; they are a poor way to make sure
that what everybody thought of is run. A bug that needs grouped experts
with per-expert adapters in training is caught by three random MoE draws
only when they happen to land there. So every property run starts with a
small *designed* set of examples whose features are fixed in advance:

* the features (``Factor``) are the contract's paths at that family and
  layout: which modules are targeted (by name, by wildcard, in exclude
  mode), training or inference, dropout off/pre/post, one or two
  micro-batches, each init method (A and B), each adapter dtype, the base
  dtype, the gated MLP, biases, one or two attention query groups per TP
  rank, ``a2a_experimental`` where the layout has sequence parallelism; for
  MoE also sequential or grouped experts, shared
  or per-expert adapters, shared experts present or not, both token
  dispatchers, ``normalize_moe_lora`` on and off;
* the rows form a covering array of strength 2: every pair of values of
  any two features appears together in at least one row (where the two can
  appear together at all: ``_valid`` holds the few rules the harness's
  exact comparisons impose, such as dropout in training only on float64
  values), and for MoE every triple of expert kind x adapter sharing x
  training does too. Not the full product: a greedy construction (each new
  row covers the most pairs and triples not covered yet; ties go to the
  earliest row in the product's order, so the set is deterministic) gives
  about (largest factor) x (second largest) rows, 16 to 30 per layout.

The set depends only on the family, the layout and the implementation's
declared capabilities (``Capabilities``), never on its behaviour, so every
implementation is checked on the same designed examples. Each row becomes
a hypothesis strategy with those features fixed (``harness.strategies``,
``row=...``) and the shape floored at a size where every check has power
(enough dropout elements, two layers, a batch of two); the driver runs it
as a one-example search, so a failing designed example is shrunk (inside
its row: the features that trigger the bug stay) and stored like a drawn
one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, Optional

from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.layouts import ParallelLayout

__all__ = ["Factor", "factors", "designed_rows", "row_of_case", "Coverage", "coverage_of", "TARGETS", "DROPOUT_P"]

#: Dropout probability of a designed row with dropout on: the largest drawn,
#: so that the dropout checks decide (``harness.properties.dropout_spec``).
DROPOUT_P = 0.5


@dataclass(frozen=True)
class Factor:
    """One feature of an example and the values the design gives it (the first is the plainest)."""

    name: str
    levels: tuple[Any, ...]
    doc: str = ""


#: target_modules / exclude_modules per family and targets level.
TARGETS: dict[str, dict[str, dict[str, list[str]]]] = {
    "gpt": {
        "names": {"target_modules": list(DEFAULT_TARGET_MODULES), "exclude_modules": []},
        "wildcards": {"target_modules": ["*linear_proj", "*.layers.*.mlp.linear_fc*", "*.layers.0.*.linear_qkv"],
                      "exclude_modules": []},
        "exclude": {"target_modules": [], "exclude_modules": ["linear_proj"]},
    },
    "moe": {
        # Routed experts by wildcard (shared experts too, where the model has them).
        "experts": {"target_modules": ["*.experts.*linear_fc1", "*.experts.*linear_fc2"], "exclude_modules": []},
        # Plain names: dense attention, routed and shared experts alike.
        "names": {"target_modules": list(DEFAULT_TARGET_MODULES), "exclude_modules": []},
        "exclude": {"target_modules": [], "exclude_modules": ["linear_qkv"]},
    },
    "vlm": {
        "vision": {"target_modules": ["*vision_model*linear_qkv", "*vision_model.*linear_fc2"], "exclude_modules": []},
        "projection": {"target_modules": ["*vision_projection.*linear_fc*"], "exclude_modules": []},
        "language": {"target_modules": ["*.decoder.layers.0.*linear_fc1", "*language_model.*linear_proj", "output_layer"],
                     "exclude_modules": []},
        "exclude": {"target_modules": [], "exclude_modules": ["*language_model*"]},
    },
}
_SHARED_PATTERN = "*shared_experts.linear_fc*"


def targets_for(family: str, level: str, shared_experts: bool = False) -> dict[str, list[str]]:
    """The target/exclude lists of a targets level (MoE's "experts" adds the shared experts where present)."""
    out = {k: list(v) for k, v in TARGETS[family][level].items()}
    if family == "moe" and level == "experts" and shared_experts:
        out["target_modules"].append(_SHARED_PATTERN)
    return out


_GROUPS_DOC = ("attention query groups per TP rank: with two, the fused QKV output interleaves [q k v] per group, "
               "so a blocked q|k|v order shows; with one it cannot")


def _init_levels(methods: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(A, B) init pairs: each method once as A and once as B (A cycles, B is the next method)."""
    methods = list(methods)
    return tuple((methods[i], methods[(i + 1) % len(methods)]) for i in range(len(methods)))


def factors(family: str, layout: ParallelLayout, caps: Optional[Capabilities] = None) -> list[Factor]:
    """The features a designed example fixes at this family and layout, inside ``caps``."""
    caps = caps or Capabilities()
    if family == "gpt":
        out = [
            Factor("targets", tuple(TARGETS["gpt"]), "modules chosen by name, by wildcard, or in exclude mode"),
            Factor("training", (True, False), "an optimizer step and gradients, or inference"),
            Factor("dropout", ("none", "pre", "post"), f"dropout off, or p={DROPOUT_P} before / after the adapter"),
            Factor("micro_batches", (1, 2), "gradients accumulated over one or two micro-batches"),
            Factor("init", _init_levels(caps.init_methods), "(A, B) init methods"),
            Factor("lora_dtype", tuple(caps.lora_dtypes) or (None,), "adapter dtype (None: the base weight's)"),
            Factor("model_dtype", ("float64", "float32", "bfloat16"), "base model dtype"),
            Factor("gated", (True, False), "gated (SwiGLU-style) MLP: fc1 holds gate and up"),
            Factor("bias", (False, True), "biased linears"),
            Factor("query_groups", (2, 1), _GROUPS_DOC),
        ]
        if layout.sp and caps.a2a:
            out.append(Factor("a2a", (False, True), "a2a_experimental under sequence parallelism"))
        return out
    if family == "moe":
        exact = tuple(d for d in caps.lora_dtypes if d in (None, "float64")) or (None,)
        return [
            Factor("targets", tuple(TARGETS["moe"]), "routed experts by wildcard, plain names, or exclude mode"),
            Factor("expert_kind", ("sequential", "grouped") if caps.grouped_experts else ("sequential",),
                   "SequentialMLP or grouped experts"),
            Factor("share_expert_adapters", (True, False), "one adapter shared by the experts, or one per expert"),
            Factor("training", (True, False), "an optimizer step and gradients, or inference"),
            Factor("shared_experts", (False, True), "the layer has a shared expert"),
            Factor("dispatcher", ("alltoall", "allgather"), "token dispatcher"),
            Factor("dropout", ("none", "pre", "post"), f"dropout off, or p={DROPOUT_P} before / after the adapter"),
            Factor("init", _init_levels(caps.init_methods), "(A, B) init methods"),
            Factor("lora_dtype", exact, "adapter dtype (MoE compares float64 values exactly)"),
            Factor("normalize_moe_lora", (False, True), "expert rank divided by top-k"),
            Factor("gated", (True, False), "gated expert MLPs"),
            Factor("query_groups", (2, 1), _GROUPS_DOC),
        ]
    if family == "vlm":
        # The VLM task runs the 16 freeze-flag x training combinations itself,
        # and what it checks (which parameters train) does not depend on the
        # init method, which stays drawn (never zero).
        return [
            Factor("targets", tuple(TARGETS["vlm"]), "vision tower, projection, language model, or exclude mode"),
            Factor("gated", (True, False), "gated MLPs"),
            Factor("bias", (False, True), "biased linears"),
        ]
    raise ValueError(f"no designed examples for family {family!r}; known: gpt, moe, vlm")


#: Interactions of strength 3 that must also be covered, per family.
TRIPLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "moe": (("expert_kind", "share_expert_adapters", "training"),),
}


def _valid(family: str, row: Mapping[str, Any]) -> bool:
    """Whether a row can be an example: the rules the harness's exact comparisons impose."""
    if family == "gpt":
        if not row["training"] and row["micro_batches"] != 1:
            return False  # inference runs one forward pass
        if row["training"] and row["dropout"] != "none":
            # Training dropout compares through value-keyed masks: float64 values on both sides.
            return row["model_dtype"] == "float64" and row["lora_dtype"] in (None, "float64")
    return True


@lru_cache(maxsize=None)
def _design(family: str, layout: ParallelLayout, caps: Capabilities) -> tuple[tuple[Factor, ...], tuple[dict[str, Any], ...]]:
    import numpy as np

    fs = tuple(factors(family, layout, caps))
    names = [f.name for f in fs]
    sizes = [len(f.levels) for f in fs]
    valid = [
        idx for idx in itertools.product(*(range(n) for n in sizes))
        if _valid(family, {f.name: f.levels[i] for f, i in zip(fs, idx)})
    ]
    rows = np.array(valid, dtype=np.int64)
    interactions = [tuple(p) for p in itertools.combinations(range(len(fs)), 2)]
    interactions += [tuple(names.index(n) for n in t) for t in TRIPLES.get(family, ()) if all(n in names for n in t)]
    # Each (interaction, level combination) gets one id; a row covers one id per interaction.
    columns, offset = [], 0
    for inter in interactions:
        code = np.zeros(len(rows), dtype=np.int64)
        for k in inter:
            code = code * sizes[k] + rows[:, k]
        columns.append(code + offset)
        offset += int(np.prod([sizes[k] for k in inter]))
    ids = np.stack(columns, axis=1)
    needed = np.zeros(offset, dtype=bool)
    needed[ids.ravel()] = True  # only combinations some valid row has
    chosen: list[int] = []
    while needed.any():
        gain = needed[ids].sum(axis=1)
        best = int(np.argmax(gain))  # the first of the best: deterministic
        chosen.append(best)
        needed[ids[best]] = False
    design = tuple({f.name: f.levels[int(i)] for f, i in zip(fs, rows[c])} for c in chosen)
    return fs, design


def designed_rows(family: str, layout: ParallelLayout, caps: Optional[Capabilities] = None) -> list[dict[str, Any]]:
    """The designed rows (feature name -> value) for a family, layout and capabilities, in run order."""
    return [dict(r) for r in _design(family, layout, caps or Capabilities())[1]]


def row_of_case(family: str, case: Mapping[str, Any]) -> dict[str, Any]:
    """The features of a case (its JSON form), as the design names them: what the example exercised."""
    lora = case.get("lora") or {}
    shape = case.get("shape") or {}
    out: dict[str, Any] = {}
    targets = {"target_modules": list(lora.get("target_modules") or []), "exclude_modules": list(lora.get("exclude_modules") or [])}
    for level in TARGETS.get(family, {}):
        if targets in (targets_for(family, level, False), targets_for(family, level, True)):
            out["targets"] = level
    if family != "vlm":
        out["init"] = (lora.get("lora_A_init_method", "xavier"), lora.get("lora_B_init_method", "zero"))
    out["gated"] = bool(shape.get("gated_linear_unit", False))
    out["bias"] = bool(shape.get("add_bias_linear", False))
    if family == "vlm":
        return out
    if "layout" in case and shape.get("num_query_groups"):
        out["query_groups"] = shape["num_query_groups"] // ParallelLayout.parse(case["layout"]).tp
    out["training"] = bool(case.get("training", True))
    p = float(lora.get("dropout", 0.0) or 0.0)
    out["dropout"] = "none" if p == 0 else lora.get("dropout_position", "pre")
    out["lora_dtype"] = case.get("lora_dtype")
    if family == "gpt":
        out["micro_batches"] = int(case.get("micro_batches", 1) or 1)
        out["model_dtype"] = case.get("model_dtype", "float32")
        out["a2a"] = bool(lora.get("a2a_experimental", False))
    if family == "moe":
        out["expert_kind"] = "grouped" if shape.get("grouped") else "sequential"
        out["share_expert_adapters"] = bool(lora.get("share_expert_adapters", True))
        out["shared_experts"] = shape.get("shared_expert_ffn_hidden_size") is not None
        out["dispatcher"] = shape.get("dispatcher", "alltoall")
        out["normalize_moe_lora"] = bool(lora.get("normalize_moe_lora", False))
    return out


@dataclass(frozen=True)
class Coverage:
    """What the examples that ran at one family and layout exercised, against the design."""

    family: str
    layout: str
    designed: int            # rows in the design
    designed_run: int        # designed examples that ran
    pairs: int               # feature-value pairs (and triples) the design covers
    pairs_run: int           # of those, covered by the examples that ran (designed or drawn)
    levels: dict[str, tuple[Any, ...]]   # feature -> values that ran
    missing: tuple[str, ...]             # feature values of the design no example ran

    def line(self) -> str:
        head = (f"{self.family} {self.layout}: designed {self.designed_run}/{self.designed} examples ran, "
                f"{self.pairs_run}/{self.pairs} feature pairs{' and triples' if self.family in TRIPLES else ''} exercised")
        paths = "; ".join(f"{name} {'/'.join(_show(v) for v in vals)}" for name, vals in self.levels.items() if vals)
        tail = f"; NOT exercised: {', '.join(self.missing)}" if self.missing else ""
        return f"{head}: {paths}{tail}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    if value is None:
        return "base"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def coverage_of(family: str, layout: ParallelLayout, caps: Optional[Capabilities], cases: Iterable[Mapping[str, Any]],
                designed_run: int) -> Coverage:
    """Which of the design's feature values, pairs and triples the given cases (JSON) exercised."""
    fs, design = _design(family, layout, caps or Capabilities())
    wanted = _combos(family, fs, design)
    seen_rows = [row_of_case(family, c) for c in cases]
    got = _combos(family, fs, seen_rows)
    levels = {f.name: tuple(v for v in f.levels if any(r.get(f.name) == v for r in seen_rows)) for f in fs}
    missing = tuple(f"{f.name}={_show(v)}" for f in fs for v in f.levels if v not in levels[f.name])
    return Coverage(family, layout.describe(), len(design), designed_run, len(wanted), len(wanted & got), levels, missing)


def _combos(family: str, fs: tuple[Factor, ...], rows: Iterable[Mapping[str, Any]]) -> set[tuple]:
    names = [f.name for f in fs]
    inters = [tuple(p) for p in itertools.combinations(names, 2)] + [t for t in TRIPLES.get(family, ()) if all(n in names for n in t)]
    out = set()
    for r in rows:
        if not all(n in r for n in names):
            continue
        for inter in inters:
            out.add((inter, tuple(repr(r[n]) for n in inter)))
    return out


def coverage_lines(outcomes: Iterable[Any], caps: Optional[Capabilities] = None) -> list[str]:
    """One line per family and layout: the design's paths the outcomes' examples exercised.

    ``outcomes`` are ``PropertyOutcome``s (any properties, one implementation);
    the examples of every property at a layout count together (they share
    their cases), skipped cells count nothing.
    """
    per: dict[tuple[str, str], dict[str, Any]] = {}
    designed: dict[tuple[str, str], int] = {}
    for outcome in outcomes:
        family = getattr(outcome, "family", "gpt")
        key = (family, outcome.layout.split(":")[-1])
        cases = per.setdefault(key, {})
        for rec in outcome.records:
            if rec.source in ("designed", "drawn", "regression"):
                cases[repr(sorted(rec.case.items(), key=lambda kv: kv[0]))] = rec.case
        designed[key] = max(designed.get(key, 0), getattr(outcome, "designed", 0))
    lines = []
    for (family, layout), cases in sorted(per.items()):
        if not cases:
            continue
        cov = coverage_of(family, ParallelLayout.parse(layout), caps, cases.values(), designed[(family, layout)])
        lines.append(cov.line())
    return lines
