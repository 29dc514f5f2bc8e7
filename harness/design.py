"""Designed examples: a covering array of the contract's code paths, run at every layout before random draws.

This module builds and reports the array; each family's features, levels
and rules live in its folder (``harness.families.<name>.design``).

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
  appear together at all: the family's ``FamilyDesign.valid`` holds the few rules the harness's
  exact comparisons impose, such as dropout in training only on float64
  values), and for MoE every triple of expert kind x adapter sharing x
  training does too, in a row that does not train with dropout. Not the full product: a greedy construction (each new
  row covers the most pairs and triples not covered yet), then rows another
  row makes redundant are dropped; of ``RESTARTS`` such constructions (ties
  broken by the product's order, then at random from a fixed seed, so the
  set is deterministic) the smallest is kept: about (largest factor) x
  (second largest) rows, 8 to 26 per layout. They run in ``row_priority``
  order (training, exact dtypes, a non-zero adapter delta, no dropout and
  paths added first), so under ``pytest -x`` a bug most rows show comes
  from the first.

The set depends only on the family, the layout and the implementation's
declared capabilities (``Capabilities``), never on its behaviour, so every
implementation is checked on the same designed examples. Each row becomes
a hypothesis strategy with those features fixed (the family's ``strategy``,
``row=...``) and the shape floored at a size where every check has power
(enough dropout elements, two layers, a batch of two); the driver runs it
as a one-example search, so a failing designed example is shrunk (inside
its row: the features that trigger the bug stay) and stored like a drawn
one.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Optional

from harness.contract import Capabilities
from harness.layouts import ParallelLayout

__all__ = ["Factor", "factors", "designed_rows", "row_of_case", "common_row", "training_row", "targets_for", "init_levels",
           "Coverage", "coverage_of", "row_priority", "coverage_lines", "GROUPS_DOC", "DROPOUT_P", "loop_factors", "loop_row", "checkpoint_row"]

#: Dropout probability of a designed row with dropout on: the largest drawn,
#: so that the dropout checks decide (``harness.properties.dropout_spec``).
DROPOUT_P = 0.5


@dataclass(frozen=True)
class Factor:
    """One feature of an example and the values the design gives it (the first is the plainest)."""

    name: str
    levels: tuple[Any, ...]
    doc: str = ""


def _family_design(family: str) -> Any:
    from harness.families import get_family

    return get_family(family).design


def targets_for(family: str, level: str, shared_experts: bool = False) -> dict[str, list[str]]:
    """The target/exclude lists of one of the family's targets levels (its ``FamilyDesign.targets``)."""
    design = _family_design(family)
    if design.targets_for is not None:
        return design.targets_for(level, shared_experts)
    return {k: list(v) for k, v in design.targets[level].items()}


#: Attention query groups per TP rank, as a designed feature (the dense and MoE families).
GROUPS_DOC = ("attention query groups per TP rank: with two, the fused QKV output interleaves [q k v] per group, "
              "so a blocked q|k|v order shows; with one it cannot")


def init_levels(methods: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(A, B) init pairs: each method once as A and once as B (A cycles, B is the next method)."""
    methods = list(methods)
    return tuple((methods[i], methods[(i + 1) % len(methods)]) for i in range(len(methods)))


def factors(family: str, layout: ParallelLayout, caps: Optional[Capabilities] = None) -> list[Factor]:
    """The features a designed example fixes at this family and layout, inside ``caps``."""
    return list(_family_design(family).factors(layout, caps or Capabilities()))


def _triples(family: str) -> tuple[tuple[str, str, str], ...]:
    return tuple(_family_design(family).triples)


#: Greedy constructions tried per design (restart 0 breaks ties by the
#: product's order, restart 1 at random from a fixed seed); the smallest
#: array wins. Two cut the rows by 10-20% against one greedy pass (dense
#: 29 -> 25-26, MoE 19 -> 15; 16 since expert triples count only in rows that do not train with
#: dropout); four found no smaller array at --tp 2 --ep 2.
RESTARTS = 2


@lru_cache(maxsize=None)
def _design(family: str, layout: ParallelLayout, caps: Capabilities,
            only: Optional[tuple[str, ...]] = None) -> tuple[tuple[Factor, ...], tuple[dict[str, Any], ...]]:
    fs = tuple(factors(family, layout, caps))
    if only is None:
        return fs, _cover(family, fs)
    # The training loop's features join only the designs of the properties that read them: the loop
    # does not change what the other properties run, and its product would multiply theirs.
    fs += tuple(f for f in loop_factors(layout, family) if f.name in only)
    from harness.checkpoint import checkpoint_factors

    fs += tuple(f for f in checkpoint_factors(layout, family) if f.name in only)
    # Every feature the family has at some layout (a2a only under sequence parallelism).
    known = {f.name for f in factors(family, ParallelLayout(tp=2, sp=True), Capabilities())} | {f.name for f in fs}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ValueError(f"design features {unknown} are not features of the {family} family ({', '.join(sorted(known))})")
    # The features the property does not read keep their plainest value.
    narrowed = tuple(f if f.name in only else Factor(f.name, f.levels[:1], f.doc) for f in fs)
    return fs, _cover(family, narrowed)


#: Feature values that add a path to an example (the last key of ``row_priority``).
_RICH = (("targets", "names"), ("gated", True), ("bias", True), ("query_groups", 2), ("micro_batches", 2),
         ("shared_experts", True), ("expert_kind", "grouped"), ("dispatcher", "alltoall"), ("overlap_grad_reduce", True),
         ("distributed_optimizer", True), ("per_token_loss", True))
_SIXTEEN_BIT = ("bfloat16", "float16")


def row_priority(row: Mapping[str, Any]) -> tuple[int, ...]:
    """How much a designed row can show at once: the rows run highest first (ties in construction order).

    Compared in turn: training (gradients and an optimizer step, which
    inference never runs); exact dtypes (a 16-bit comparison's bound is
    wider); an adapter whose delta is not zero from the start (no ``zero``
    init); a path only some layouts have (a2a under sequence parallelism:
    what the layout is for); no dropout (dropout examples are judged more
    loosely); then the number of feature values that add a path (every
    default target by name: dense attention, MLPs and experts at once; gated
    MLP, biases, two query groups per rank, two micro-batches, shared
    experts, grouped experts, the all-to-all dispatcher, overlapped
    reduction, the distributed optimizer, per-token loss, recompute). The
    order changes which row runs first, never which rows run: under
    ``pytest -x`` a bug most rows would show is then reported from the first.
    """
    paths = sum(row.get(name) == value for name, value in _RICH) + (row.get("recompute", "none") != "none")
    return (int(bool(row.get("training", True))),
            int(row.get("lora_dtype") not in _SIXTEEN_BIT and row.get("model_dtype") not in _SIXTEEN_BIT),
            int("zero" not in tuple(row.get("init") or ())),
            int(row.get("a2a") is True),
            int(row.get("dropout", "none") == "none"),
            paths)


def _valid(family: str, row: dict[str, Any]) -> bool:
    from harness.training import row_valid

    return _family_design(family).valid(row) and row_valid(row)


@lru_cache(maxsize=None)
def _cover(family: str, fs: tuple[Factor, ...]) -> tuple[dict[str, Any], ...]:
    """A small covering array over ``fs`` (a deterministic function of the family and the factors)."""
    import numpy as np

    names = [f.name for f in fs]
    sizes = [len(f.levels) for f in fs]
    valid = [
        idx for idx in itertools.product(*(range(n) for n in sizes))
        if _valid(family, {f.name: f.levels[i] for f, i in zip(fs, idx)})
    ]
    rows = np.array(valid, dtype=np.int64)
    interactions = [tuple(p) for p in itertools.combinations(range(len(fs)), 2)]
    interactions += [tuple(names.index(n) for n in t) for t in _triples(family) if all(n in names for n in t)]
    # Each (interaction, level combination) gets one id; a row covers one id per interaction.
    columns, offset = [], 0
    for inter in interactions:
        code = np.zeros(len(rows), dtype=np.int64)
        for k in inter:
            code = code * sizes[k] + rows[:, k]
        columns.append(code + offset)
        offset += int(np.prod([sizes[k] for k in inter]))
    ids = np.stack(columns, axis=1)
    if "dropout" in names:
        # A triple counts only in a row that does not train with dropout: such rows judge gradients
        # more loosely (a keyed mask near a cell boundary makes a difference undecidable), so a bug
        # that needs the triple must not depend on whether the rows that carry it happen to drop.
        dropout = fs[names.index("dropout")]
        dropping = np.array([dropout.levels[i] != "none" for i in rows[:, names.index("dropout")]], dtype=bool)
        if "training" in names:
            training = fs[names.index("training")]
            dropping &= np.array([bool(training.levels[i]) for i in rows[:, names.index("training")]], dtype=bool)
        # The triples' columns follow the pairs'; in a dropping row they all name one id never wanted.
        dummy = offset
        offset += 1
        ids[dropping, len(fs) * (len(fs) - 1) // 2:] = dummy
    wanted = np.zeros(offset, dtype=bool)
    wanted[ids.ravel()] = True  # only combinations some valid row has
    if "dropout" in names:
        wanted[dummy] = False

    def greedy(rng: Any) -> list[int]:
        needed = wanted.copy()
        chosen: list[int] = []
        while needed.any():
            gain = needed[ids].sum(axis=1)
            best = np.flatnonzero(gain == gain.max())
            chosen.append(int(best[0] if rng is None else best[rng.integers(len(best))]))
            needed[ids[chosen[-1]]] = False
        # Drop rows whose every combination another row covers (latest first).
        for r in reversed(list(chosen)):
            others = [c for c in chosen if c != r]
            covered = np.zeros(offset, dtype=bool)
            covered[ids[others].ravel()] = True
            if covered[ids[r]].all():
                chosen = others
        return chosen

    rng = np.random.default_rng(0)
    best = min((greedy(None if k == 0 else rng) for k in range(RESTARTS)), key=len)  # the first of the smallest
    return tuple({f.name: f.levels[int(i)] for f, i in zip(fs, rows[c])} for c in best)


def designed_rows(family: str, layout: ParallelLayout, caps: Optional[Capabilities] = None,
                  only: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
    """The designed rows (feature name -> value) for a family, layout and capabilities, in run order
    (``row_priority``, highest first).

    ``only``: cover the pairs of these features alone (a property that reads
    no others; ``Property.design_factors``), the rest at their first level.
    Features the layout does not have (``a2a`` without SP) are ignored.
    """
    key = None if only is None else tuple(sorted(set(only)))
    rows = [dict(r) for r in _design(family, layout, caps or Capabilities(), key)[1]]
    return sorted(rows, key=row_priority, reverse=True)


def row_of_case(family: str, case: Mapping[str, Any]) -> dict[str, Any]:
    """The features of a case (its JSON form), as the family's design names them: what the example exercised."""
    return _family_design(family).row_of_case(case)


def common_row(family: str, case: Mapping[str, Any], init: bool = True) -> dict[str, Any]:
    """The features every family's ``row_of_case`` starts from: targets level, init methods, gated MLP, biases."""
    lora = case.get("lora") or {}
    shape = case.get("shape") or {}
    out: dict[str, Any] = {}
    targets = {"target_modules": list(lora.get("target_modules") or []), "exclude_modules": list(lora.get("exclude_modules") or [])}
    for level in _family_design(family).targets:
        if targets in (targets_for(family, level, False), targets_for(family, level, True)):
            out["targets"] = level
    if init:
        out["init"] = (lora.get("lora_A_init_method", "xavier"), lora.get("lora_B_init_method", "zero"))
    out["gated"] = bool(shape.get("gated_linear_unit", False))
    out["bias"] = bool(shape.get("add_bias_linear", False))
    return out


def training_row(case: Mapping[str, Any]) -> dict[str, Any]:
    """The training features of a case (dense and MoE): query groups per TP rank, training, dropout, adapter dtype."""
    lora = case.get("lora") or {}
    shape = case.get("shape") or {}
    out: dict[str, Any] = {}
    if "layout" in case and shape.get("num_query_groups"):
        out["query_groups"] = shape["num_query_groups"] // ParallelLayout.parse(case["layout"]).tp
    out["training"] = bool(case.get("training", True))
    p = float(lora.get("dropout", 0.0) or 0.0)
    out["dropout"] = "none" if p == 0 else lora.get("dropout_position", "pre")
    out["lora_dtype"] = case.get("lora_dtype")
    return out


def loop_factors(layout: ParallelLayout, family: str = "gpt") -> list[Factor]:
    """The training loop's designed features (``harness.training``; the training properties read them)."""
    from harness.training import FLOAT64_ONLY, data_parallel_size

    out = [
        Factor("optimizer", ("adam", "sgd"), "megatron-core's optimizer: Adam, or SGD with momentum"),
        Factor("overlap_grad_reduce", (False, True), "megatron DDP reduces gradients as backward runs"),
        # Full recompute of the first of two layers stands for both full settings here (uniform over
        # every layer is drawn, and recompute_transparent runs every setting on every example).
        Factor("recompute", ("none", "full-block", "selective"), "activation recompute inside the training loop"),
        Factor("per_token_loss", (False, True), "megatron's per-token loss: normalised by the global batch's tokens"),
    ]
    # One level where DP=1: the distributed optimizer shards over data-parallel ranks.
    dist = data_parallel_size(layout) > 1 and family not in FLOAT64_ONLY
    out.append(Factor("distributed_optimizer", (False, True) if dist else (False,),
                      "megatron-core's distributed optimizer (DP > 1)"))
    # bf16 loops at TP=1 only (harness.training.layout_problem).
    out.append(Factor("bf16", (False, True) if family not in FLOAT64_ONLY and layout.tp == 1 else (False,),
                      "bf16 parameters, megatron's float32 main parameters (SGD, TP=1)"))
    return out


def loop_row(case: Mapping[str, Any]) -> dict[str, Any]:
    """The training loop's features of a case (its JSON form); none for a case without a loop."""
    loop = case.get("loop")
    if not loop:
        return {}
    return {"optimizer": loop.get("optimizer", "adam"), "overlap_grad_reduce": bool(loop.get("overlap_grad_reduce")),
            "recompute": loop.get("recompute", "none"),
            "distributed_optimizer": bool(loop.get("distributed_optimizer")), "bf16": bool(loop.get("bf16")),
            "per_token_loss": bool(loop.get("per_token_loss"))}


def checkpoint_row(case: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint feature of a case (its JSON form): where it is loaded; none when not drawn."""
    return {"load_layout": case["load_layout"]} if case.get("load_layout") else {}


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
    #: The training loops the examples ran (harness.training): field -> the values seen.
    loops: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: The layouts checkpoints saved here were loaded at (harness.checkpoint).
    loads: tuple[str, ...] = ()

    def line(self) -> str:
        head = (f"{self.family} {self.layout}: designed {self.designed_run}/{self.designed} examples ran, "
                f"{self.pairs_run}/{self.pairs} feature pairs{' and triples' if _triples(self.family) else ''} exercised")
        paths = "; ".join(f"{name} {'/'.join(_show(v) for v in vals)}" for name, vals in self.levels.items() if vals)
        tail = f"; NOT exercised: {', '.join(self.missing)}" if self.missing else ""
        loops = ""
        if self.loops:
            loops = "; training loops: " + "; ".join(
                f"{name} {'/'.join(_show(v) for v in vals)}" for name, vals in self.loops.items())
        loads = f"; checkpoints loaded at {'/'.join(self.loads)}" if self.loads else ""
        return f"{head}: {paths}{tail}{loops}{loads}"


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
    from harness.training import TrainingLoop

    loops = [c["loop"] for c in cases if c.get("loop")]
    seen_loops: dict[str, tuple[Any, ...]] = {}
    # Every field of the loop but ``replicas`` (the reference's; None in a case).
    for name in (f.name for f in dataclasses.fields(TrainingLoop) if f.name != "replicas"):
        values = {loop.get(name) for loop in loops}
        if values:
            seen_loops[name] = tuple(sorted(values, key=repr))
    loads = tuple(sorted({str(c["load_layout"]) for c in cases if c.get("load_layout")}))
    return Coverage(family, layout.describe(), len(design), designed_run, len(wanted), len(wanted & got), levels, missing,
                    seen_loops, loads)


def _combos(family: str, fs: tuple[Factor, ...], rows: Iterable[Mapping[str, Any]]) -> set[tuple]:
    names = [f.name for f in fs]
    inters = [tuple(p) for p in itertools.combinations(names, 2)] + [t for t in _triples(family) if all(n in names for n in t)]
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
