"""Typed, serialisable outcomes: what a rank returns, what a property concludes, what a run writes.

Three levels:

* ``RankRecord`` / ``ErrorRecord``: what one rank returns for one case
  (tensors, the partition table used to put shards back together, findings,
  and the task's own evidence, typed per task in ``harness.evidence``);
* ``Check``: one property's verdict on one example, with per-tensor
  ``Comparison``s (structured ``Location``, error statistics, tolerance) and
  ``Finding``s;
* ``ExampleRecord`` / ``PropertyOutcome`` / ``RunResults``: what the driver
  collects and the reports (``harness.report``) write as ``results.json``
  (schema ``SCHEMA_VERSION``).

Verdicts, most severe first: ``hang``, ``crash``, ``numeric`` (wrong outputs
or gradients), ``contract`` (a SPEC behaviour the implementation promised,
broken), ``harness`` (the example fails with a known-good control
implementation too: a defect of the harness, never charged to the
implementation), ``advisory`` (a point where SPEC is stricter than the
contract the implementation declared: reported, never failing),
``vacuous`` (nothing to check: no adapter, no dropout call, or a chance
check without the power to decide), ``pass``, ``skipped``.

The first four are ``failing``: charged to the implementation under test.
``harness`` is not, but a run that meets one does not pass either.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from harness.compare import ErrorStats, Tolerance

__all__ = ["SCHEMA_VERSION", "Verdict", "Location", "Comparison", "Finding", "Note", "Check", "ExampleRecord",
           "PropertyOutcome", "RunResults", "case_features", "coverage", "json_number", "number_from_json"]

SCHEMA_VERSION = 1
# Findings spelled out in a failure message; every one is in the records.
MESSAGE_FINDINGS = 6


class Verdict(str, enum.Enum):
    HANG = "hang"
    CRASH = "crash"
    NUMERIC = "numeric"
    CONTRACT = "contract"
    HARNESS = "harness"
    ADVISORY = "advisory"
    VACUOUS = "vacuous"
    PASS = "pass"
    SKIPPED = "skipped"

    @property
    def failing(self) -> bool:
        """Charged to the implementation under test."""
        return self in (Verdict.HANG, Verdict.CRASH, Verdict.NUMERIC, Verdict.CONTRACT)

    @property
    def ok(self) -> bool:
        """Neither charged to the implementation nor a defect of the harness."""
        return not self.failing and self is not Verdict.HARNESS

    @property
    def severity(self) -> int:
        return list(Verdict).index(self)

    @classmethod
    def of_finding(cls, kind: Any, binding: Any = True) -> "Verdict":
        """A finding's verdict from its ``kind`` and ``binding`` (``Finding.verdict``; the reports read it from JSON)."""
        if kind == "numeric":
            return cls.NUMERIC
        return cls.CONTRACT if binding else cls.ADVISORY

    @classmethod
    def worst(cls, verdicts: Any) -> "Verdict":
        verdicts = list(verdicts)
        return min(verdicts, key=lambda v: v.severity) if verdicts else cls.PASS


@dataclass(frozen=True)
class Location:
    """Where a compared quantity lives: ``quantity`` of ``param`` (None: the model) on ``ranks``."""

    quantity: str  # "output", "input_grad", "gradient", "initial value", ...
    param: Optional[str] = None
    ranks: tuple[int, ...] = ()

    def describe(self) -> str:
        what = self.quantity if self.param is None else f"{self.quantity} of {self.param}"
        if not self.ranks:
            return what
        if len(self.ranks) == 1:
            return f"{what} on rank {self.ranks[0]}"
        return f"{what} (gathered over ranks {list(self.ranks)})"


@dataclass(frozen=True)
class Comparison:
    location: Location
    stats: ErrorStats
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.stats.passed

    @property
    def ratio(self) -> float:
        """max|diff| over the bound: < 1 passes. The number reports plot."""
        bound = self.tolerance.atol + self.tolerance.rtol * self.stats.ref_max
        if math.isinf(self.stats.max_abs):
            return math.inf
        return self.stats.max_abs / bound if bound > 0 else (0.0 if self.stats.max_abs == 0 else math.inf)

    def to_json(self) -> dict[str, Any]:
        return {
            "location": asdict(self.location) | {"ranks": list(self.location.ranks)},
            "max_abs": json_number(self.stats.max_abs),
            "max_rel": json_number(self.stats.max_rel),
            "ref_max": json_number(self.stats.ref_max),
            "numel": self.stats.numel,
            "worst_index": None if self.stats.worst_index is None else list(self.stats.worst_index),
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
            "ratio": json_number(self.ratio),
            "passed": self.passed,
            "baseline_abs": None if self.stats.baseline_abs is None else json_number(self.stats.baseline_abs),
        }


@dataclass(frozen=True)
class Finding:
    """Something wrong that is not a tensor comparison (or is one, summarised).

    ``kind``: ``"numeric"`` or ``"contract"``; ``binding=False`` marks a
    contract point on which the implementation declared a weaker contract
    (reported as advisory). ``check`` names the sub-check (e.g.
    ``"idempotent"``) so one finding never hides another.
    """

    kind: str
    message: str
    check: str = ""
    binding: bool = True
    location: Optional[Location] = None

    @property
    def verdict(self) -> Verdict:
        return Verdict.of_finding(self.kind, self.binding)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "check": self.check,
            "binding": self.binding,
            "message": self.message,
            "location": None if self.location is None else asdict(self.location) | {"ranks": list(self.location.ranks)},
        }


@dataclass(frozen=True)
class Note:
    """A sub-check that decided nothing on this example, and why.

    ``status``: ``"vacuous"`` (nothing to inspect: no adapter, no dropout
    call, no token routed to an expert) or ``"undecidable"`` (a check whose
    outcome rests on chance, where a correct implementation would fail it
    with probability ``p_false_alarm`` > ``harness.results.FALSE_ALARM``: it
    is not run as a verdict).
    """

    check: str
    status: str
    message: str
    p_false_alarm: Optional[float] = None

    def describe(self) -> str:
        p = "" if self.p_false_alarm is None else f" (a correct implementation would fail it with probability {self.p_false_alarm:.2g})"
        return f"[{self.status} {self.check}] {self.message}{p}"

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "message": self.message,
                "p_false_alarm": None if self.p_false_alarm is None else json_number(self.p_false_alarm)}


#: The largest probability with which a chance check may fail a correct
#: implementation on one example; a check that cannot keep to it on the
#: example at hand reports itself undecidable there instead of failing.
FALSE_ALARM = 1e-6


@dataclass
class Check:
    """One property's verdict on one example.

    ``vacuous``: set (to the reason) when the example gave the property
    nothing to check at all; the example is then ``Verdict.VACUOUS``, not a
    pass. ``notes``: sub-checks that were vacuous or undecidable.
    """

    prop: str
    comparisons: list[Comparison] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    vacuous: str = ""

    def note(self, check: str, status: str, message: str, p_false_alarm: Optional[float] = None) -> None:
        if status not in ("vacuous", "undecidable"):
            raise ValueError(f"Check.note status {status!r}: 'vacuous' or 'undecidable'")
        self.notes.append(Note(check, status, message, p_false_alarm))

    def nothing_to_check(self, reason: str) -> None:
        """The whole example is vacuous for this property (unless a finding fails it)."""
        self.vacuous = reason

    def compare(self, location: Location, stats: ErrorStats, tolerance: Tolerance, *, kind: str = "numeric", check: str = "", binding: bool = True) -> None:
        comparison = Comparison(location, stats, tolerance)
        self.comparisons.append(comparison)
        if not comparison.passed:
            self.findings.append(Finding(kind, f"{location.describe()}: {stats.reason}", check, binding, location))

    def fail(self, message: str, *, kind: str = "numeric", check: str = "", binding: bool = True, location: Optional[Location] = None) -> None:
        self.findings.append(Finding(kind, message, check, binding, location))

    @property
    def verdict(self) -> Verdict:
        if self.findings:
            return Verdict.worst(f.verdict for f in self.findings)
        return Verdict.VACUOUS if self.vacuous else Verdict.PASS

    @property
    def passed(self) -> bool:
        return not self.verdict.failing

    @property
    def worst_ratio(self) -> float:
        return max((c.ratio for c in self.comparisons), default=0.0)

    def first_difference(self) -> Optional[Finding]:
        """The failing finding to lead a report with: the first in the model's order."""
        failing = [f for f in self.findings if f.verdict.failing]
        return failing[0] if failing else None

    def message(self, case: Any) -> str:
        head = f"{self.prop} failed for impl {case.impl} at layout {case.layout}:"
        lines = [f"[{f.verdict.value}{' ' + f.check if f.check else ''}] {f.message}" for f in self.findings]
        if len(lines) > MESSAGE_FINDINGS:
            lines = lines[:MESSAGE_FINDINGS] + [f"... and {len(lines) - MESSAGE_FINDINGS} more (all in results.json)"]
        return "\n  ".join([head, *lines])


# ---------------------------------------------------------------- run level


def json_number(x: float) -> Any:
    """JSON has no inf/nan: write them as strings ("inf", "-inf", "nan"); other values unchanged."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return x


def number_from_json(value: Any) -> float:
    """A number as ``json_number`` wrote it (a number, or "inf"/"nan") back to a float; NaN for anything else."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class ExampleRecord:
    """One property on one example."""

    prop: str
    layout: str
    case: dict[str, Any]
    verdict: Verdict
    seconds: float
    comparisons: list[Comparison] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    error: str = ""
    output: dict[int, str] = field(default_factory=dict)
    source: str = "drawn"  # "designed" | "drawn" | "regression" | "replay" | "control"
    notes: list[Note] = field(default_factory=list)
    vacuous: str = ""
    # A failing example's run with the known-good control implementation
    # (None: not run, e.g. the implementation under test is the control).
    control: Optional["ExampleRecord"] = None

    @property
    def worst_ratio(self) -> float:
        return max((c.ratio for c in self.comparisons), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "property": self.prop,
            "layout": self.layout,
            "case": self.case,
            "verdict": self.verdict.value,
            "seconds": round(self.seconds, 4),
            "source": self.source,
            "worst_ratio": json_number(self.worst_ratio),
            "comparisons": [c.to_json() for c in self.comparisons],
            "findings": [f.to_json() for f in self.findings],
            "error": self.error,
            "rank_output": {str(k): v for k, v in self.output.items()},
            "notes": [n.to_json() for n in self.notes],
            "vacuous": self.vacuous,
            "control": None if self.control is None else {
                "impl": self.control.case.get("impl"), "verdict": self.control.verdict.value, "error": self.control.error,
            },
        }


@dataclass
class PropertyOutcome:
    """One property at one layout for one implementation, over every example run."""

    prop: str
    layout: str  # the layout's name; "<family>:<layout>" for a family other than gpt
    impl: str
    verdict: Verdict = Verdict.PASS
    examples: int = 0
    seconds: float = 0.0
    error: str = ""
    falsifying_example: str = ""
    minimal_case: Optional[Any] = None
    replay_command: str = ""
    skipped_reason: str = ""
    records: list[ExampleRecord] = field(default_factory=list)
    regressions_replayed: int = 0
    regression_file: str = ""
    exception: Optional[BaseException] = field(default=None, repr=False)
    family: str = "gpt"
    control_impl: str = ""  # the known-good implementation failures were checked against ("" if none)
    designed: int = 0  # designed examples run (harness.design), before the drawn ones
    found_by: str = ""  # a failing cell's example: "designed example <i> of <n>", "a drawn example", "a stored regression"

    @property
    def passed(self) -> bool:
        """Nothing charged to the implementation and no harness defect met."""
        return self.verdict.ok

    @property
    def vacuous_examples(self) -> int:
        return sum(r.verdict is Verdict.VACUOUS for r in self.records)

    @property
    def undecided_checks(self) -> int:
        return sum(n.status == "undecidable" for r in self.records for n in r.notes)

    @property
    def worst_ratio(self) -> float:
        return max((r.worst_ratio for r in self.records), default=0.0)

    def summary_line(self) -> str:
        label = {Verdict.PASS: "PASS", Verdict.SKIPPED: "SKIP", Verdict.ADVISORY: "NOTE", Verdict.VACUOUS: "VOID",
                 Verdict.HARNESS: "HBUG"}.get(self.verdict, "FAIL")
        detail = self.skipped_reason if self.verdict is Verdict.SKIPPED else (
            f"{self.examples:>4} examples  worst err/tol {self.worst_ratio:.2e}  {self.seconds:6.1f}s"
        )
        quiet = []
        if self.verdict is not Verdict.SKIPPED and self.vacuous_examples and self.verdict is not Verdict.VACUOUS:
            quiet.append(f"{self.vacuous_examples} vacuous")
        if self.verdict is not Verdict.SKIPPED and self.undecided_checks:
            quiet.append(f"{self.undecided_checks} undecidable")
        if quiet:
            detail += f"  ({', '.join(quiet)})"
        kind = {"PASS": "", "SKIP": "", "VOID": " (vacuous: nothing to check in any example)",
                "HBUG": " (harness defect: the known-good control fails too; not charged to the implementation)"
                }.get(label, f" ({self.verdict.value})")
        return f"{label}  {self.prop:<22} {self.layout:<18} {detail}{kind}"

    def to_json(self) -> dict[str, Any]:
        return {
            "property": self.prop,
            "layout": self.layout,
            "impl": self.impl,
            "family": self.family,
            "verdict": self.verdict.value,
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "worst_ratio": json_number(self.worst_ratio),
            "error": self.error,
            "falsifying_example": self.falsifying_example,
            "minimal_case": None if self.minimal_case is None else self.minimal_case.to_json(),
            "replay_command": self.replay_command,
            "skipped_reason": self.skipped_reason,
            "regressions_replayed": self.regressions_replayed,
            "regression_file": self.regression_file,
            "vacuous_examples": self.vacuous_examples,
            "undecided_checks": self.undecided_checks,
            "control_impl": self.control_impl,
            "designed_examples": self.designed,
            "found_by": self.found_by,
        }


@dataclass
class RunResults:
    """Everything one run found, as written to ``results.json``."""

    impl: str
    capabilities: dict[str, Any]
    environment: dict[str, Any]
    outcomes: list[PropertyOutcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    command: str = ""
    started: str = ""
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def failed(self) -> list[PropertyOutcome]:
        """Cells charged to the implementation under test."""
        return [o for o in self.outcomes if o.verdict.failing]

    @property
    def harness_defects(self) -> list[PropertyOutcome]:
        """Cells whose failing example failed with the known-good control too."""
        return [o for o in self.outcomes if o.verdict is Verdict.HARNESS]

    @property
    def exit_code(self) -> int:
        """0: all held; 1: the implementation failed something; 3: only harness defects were met."""
        if self.failed:
            return 1
        return 3 if self.harness_defects else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "lora-harness-results",
            "schema_version": SCHEMA_VERSION,
            "impl": self.impl,
            "capabilities": self.capabilities,
            "environment": self.environment,
            "command": self.command,
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "skipped": self.skipped,
            "cells": [o.to_json() for o in self.outcomes],
            "examples": [r.to_json() for o in self.outcomes for r in o.records],
        }


def case_features(case: dict[str, Any]) -> list[str]:
    """What a drawn example exercises beyond its layout, from its JSON form (for coverage lines)."""
    lora = case.get("lora") or {}
    low = ("bfloat16", "float16")
    found = []
    if case.get("model_dtype") in low or case.get("lora_dtype") in low:
        found.append("16-bit")
    if lora.get("a2a_experimental"):
        found.append("a2a")
    if lora.get("dropout"):
        found.append("training dropout" if case.get("training", True) else "eval dropout")
    if (case.get("micro_batches") or 1) > 1:
        found.append("2+ micro-batches")
    if not case.get("training", True):
        found.append("inference")
    return found


def coverage(outcomes: list["PropertyOutcome"]) -> dict[tuple[str, str], dict[str, int]]:
    """{(family, layout): {"examples": n, feature: count}} over the distinct examples of every outcome."""
    import json

    seen: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for outcome in outcomes:
        key = (getattr(outcome, "family", "gpt"), outcome.layout)
        for rec in outcome.records:
            seen.setdefault(key, {})[json.dumps(rec.case, sort_keys=True, default=str)] = rec.case
    out: dict[tuple[str, str], dict[str, int]] = {}
    for key, cases in seen.items():
        counts: dict[str, int] = {"examples": len(cases)}
        for case in cases.values():
            for feature in case_features(case):
                counts[feature] = counts.get(feature, 0) + 1
        out[key] = counts
    return out


def failure_text(outcome: Any, *, head: bool = True) -> str:
    """What a failed cell says, the same in the CLI, under pytest and in ``require_property``:
    the verdict, the first quantity that differs (or the fault), the minimal case and the
    command that replays it."""
    lines = []
    if head:
        line = f"{outcome.prop} at {outcome.layout} for {outcome.impl}: {outcome.verdict.value}"
        if outcome.verdict is Verdict.HARNESS:
            line += " (a defect of lora-harness, not of the implementation under test)"
        lines.append(line)
    if outcome.records and outcome.records[-1].source == "regression":
        lines.append(f"{outcome.falsifying_example} (replayed before any new draw)")
    elif outcome.found_by:
        why = " (harness.design: the same rows run at every seed, before any draw)" if outcome.found_by.startswith("designed") else ""
        lines.append(f"found by {outcome.found_by}{why}")
    lines.append(outcome.error)
    if outcome.minimal_case is not None:
        lines.append("minimal case: " + json.dumps(outcome.minimal_case.to_json(), sort_keys=True))
    if outcome.replay_command:
        lines.append("replay: " + outcome.replay_command)
    return "\n".join(lines)
