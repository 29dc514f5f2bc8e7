"""Compare two runs' ``results.json``: what regressed, what was fixed, which errors grew.

    lora-harness report --baseline OLD/results.json NEW/results.json

(``OLD`` and ``NEW`` may also be directories holding a ``results.json``.)
Cells are keyed by (property, layout). One line per changed cell::

    REGRESSED forward_matches tp2-ep1-etp2-pp1: pass -> numeric
    FIXED     ...: numeric -> pass
    CHANGED   ...: numeric -> crash          (failing in both, another kind)
    GREW      ... ratio 1.2e-05 -> 3.4e-03 (x283)
    DROPPED   ...: pass -> skipped            (no longer checked; informational)

then a count line. Exit status: 1 when anything REGRESSED (a cell that was
pass, advisory, skipped or absent now fails) or GREW; 0 otherwise, including
when failures only changed kind, were fixed or were dropped; 2 for bad usage
(a missing or unreadable file, something that is not a results.json, a
schema version this code does not read), with one line on stderr.

Why "grew" means ratio x10 *and* above 0.1
------------------------------------------
``worst_ratio`` is a cell's worst error over its tolerance, maximised over
the examples drawn. For a correct implementation it is noise, and the noise
spans orders of magnitude from example to example: float64 cells sit around
1e-4 (sum reordering costs ~1e-13 against ``rtol = 1e-9``), float32 cells
had a median of ~3e-4 and a worst of 0.14 over 800 comparisons (see
``harness.compare``). Which examples a run draws (its seed, its example
budget) moves a cell's maximum by one to two decades without any code
change. Conditioning on equal seeds and example counts would make the check
fragile (a profile change would silence it), so it stays simple:

* ``G = 10`` (``DEFAULT_GROWTH_FACTOR``): a tenfold jump of the *worst* of
  many examples is more than draw-to-draw noise usually produces;
* the new ratio must also exceed ``0.1`` (``GROWTH_FLOOR``): below that the
  cell still has a 10x margin to its tolerance, so a jump from 1e-6 to 1e-4
  -- the float64/float32 draw difference above -- never counts. What is left
  is an error that came within one decade of failing from well below it,
  which is what a half-broken change (a missing reduction on one path, a
  scale off in a rare configuration) looks like before it fails outright.

A residual false alarm is possible for float32 cells whose tail reaches
0.1; comparing runs made with the same ``--seed`` and profile removes it
(GREW lines show the example counts when they differ).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from harness.report.model import fmt_ratio
from harness.results import SCHEMA_VERSION, Verdict, number_from_json
from harness.errors import BaselineError

__all__ = [
    "DEFAULT_GROWTH_FACTOR",
    "GROWTH_FLOOR",
    "BaselineError",
    "CellChange",
    "BaselineDiff",
    "load_results",
    "compare",
    "main",
]

SCHEMA_NAME = "lora-harness-results"
DEFAULT_GROWTH_FACTOR = 10.0
GROWTH_FLOOR = 0.1


# ---------------------------------------------------------------- loading


#: The results schema versions this code reads.
KNOWN_SCHEMA_VERSIONS = (SCHEMA_VERSION,)


def _validate(data: Any, name: str, role: Optional[str] = None) -> Mapping[str, Any]:
    """``data`` if it is a results.json this code reads; ``BaselineError`` naming ``name``
    (and ``role``: the baseline or the new run) otherwise."""
    if not isinstance(data, Mapping) or data.get("schema") != SCHEMA_NAME:
        raise BaselineError(f"{name} is not a lora-harness results.json (no \"schema\": \"{SCHEMA_NAME}\")")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
        which = f"{name} ({role})" if role else name
        known = ", ".join(map(str, KNOWN_SCHEMA_VERSIONS))
        if isinstance(version, int) and not isinstance(version, bool) and version > max(KNOWN_SCHEMA_VERSIONS):
            advice = "it was written by a newer lora-harness: compare the two runs with that version"
        elif isinstance(version, int) and not isinstance(version, bool):
            advice = "it was written by an older lora-harness: rerun that run with this version"
        else:
            advice = "a results.json this lora-harness writes has an integer \"schema_version\""
        raise BaselineError(
            f"{which} has results schema version {version!r}, but this lora-harness reads version {known} only; {advice}"
        )
    if not isinstance(data.get("cells"), list):
        raise BaselineError(f"{name} has no \"cells\" list")
    return data


def _missing(p: Path) -> str:
    """Why ``p`` cannot be opened: which part of it is missing, or is a file where a directory must be."""
    for parent in reversed(p.parents):
        if str(parent) in ("", ".", parent.anchor):
            continue
        try:
            if parent.exists() and not parent.is_dir():
                return f"{p}: no such file ({parent} is a file, not a directory)"
        except OSError:
            break
    return f"{p}: no such file"


def load_results(path: str | Path, role: Optional[str] = None) -> dict[str, Any]:
    """Load and validate a ``results.json`` (or the ``results.json`` in directory ``path``).

    ``role`` ("the baseline (OLD)", "the new run (NEW)") is named in a schema
    version error, so it says which of two files is the unknown one.
    """
    p = Path(path)
    try:
        if p.is_dir():
            p = p / "results.json"
        exists = p.exists()
    except OSError as e:
        raise BaselineError(f"{p}: cannot read it ({e.strerror or e})") from e
    if not exists:
        raise BaselineError(_missing(p))
    if p.is_dir():
        raise BaselineError(f"{p}: is a directory without a results.json")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"{p}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    return dict(_validate(data, str(p), role))


# ---------------------------------------------------------------- diff


@dataclass(frozen=True)
class _CellState:
    verdict: Verdict
    ratio: float
    examples: int


def _cells(data: Mapping[str, Any], name: str) -> dict[tuple[str, str], _CellState]:
    out: dict[tuple[str, str], _CellState] = {}
    for c in data["cells"]:
        if not isinstance(c, Mapping):
            raise BaselineError(f"{name}: a cell is not an object")
        try:
            verdict = Verdict(c.get("verdict"))
        except ValueError:
            raise BaselineError(f"{name}: unknown verdict {c.get('verdict')!r} in cell {c.get('property')} {c.get('layout')}") from None
        key = (str(c.get("property")), str(c.get("layout")))
        state = _CellState(verdict, number_from_json(c.get("worst_ratio", 0.0)), int(c.get("examples") or 0))
        if key not in out or verdict.severity < out[key].verdict.severity:
            out[key] = state
    return out


@dataclass(frozen=True)
class CellChange:
    """One cell's change. ``kind``: regressed, grew, fixed, changed or dropped."""

    kind: str
    prop: str
    layout: str
    old: Optional[str]  # verdict value; None: the cell was absent
    new: Optional[str]
    old_ratio: float = 0.0
    new_ratio: float = 0.0
    old_examples: int = 0
    new_examples: int = 0

    @property
    def regression(self) -> bool:
        return self.kind in ("regressed", "grew")

    def line(self) -> str:
        where = f"{self.kind.upper():<9} {self.prop} {self.layout}"
        if self.kind == "grew":
            factor = self.new_ratio / self.old_ratio if self.old_ratio > 0 else math.inf
            times = "from 0" if math.isinf(factor) else (f"x{factor:.0f}" if factor >= 10 else f"x{factor:.2g}")
            text = f"{where} ratio {fmt_ratio(self.old_ratio)} -> {fmt_ratio(self.new_ratio)} ({times})"
            if self.old_examples != self.new_examples:
                text += f" [examples {self.old_examples} -> {self.new_examples}]"
            return text
        return f"{where}: {self.old or 'absent'} -> {self.new or 'absent'}"


@dataclass
class BaselineDiff:
    """What changed from an old run to a new one (``compare``)."""

    changes: list[CellChange] = field(default_factory=list)
    unchanged: int = 0
    added: int = 0  # cells only in the new run that do not fail
    notes: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[CellChange]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def regressed(self) -> list[CellChange]:
        return self.of("regressed")

    @property
    def grew(self) -> list[CellChange]:
        return self.of("grew")

    @property
    def fixed(self) -> list[CellChange]:
        return self.of("fixed")

    @property
    def changed(self) -> list[CellChange]:
        return self.of("changed")

    @property
    def dropped(self) -> list[CellChange]:
        return self.of("dropped")

    @property
    def has_regressions(self) -> bool:
        return any(c.regression for c in self.changes)

    def count_line(self) -> str:
        counts = [f"{len(self.of(k))} {k}" for k in ("regressed", "grew", "fixed", "changed", "dropped")]
        counts.append(f"{self.unchanged} unchanged")
        if self.added:
            counts.append(f"{self.added} new")
        verdict = "REGRESSION" if self.has_regressions else "no regression"
        return f"{verdict}: " + ", ".join(counts)

    def lines(self) -> list[str]:
        order = {"regressed": 0, "grew": 1, "changed": 2, "fixed": 3, "dropped": 4}
        changes = sorted(self.changes, key=lambda c: order.get(c.kind, 9))
        return [*self.notes, *(c.line() for c in changes), self.count_line()]


def compare(old: Mapping[str, Any], new: Mapping[str, Any], growth_factor: float = DEFAULT_GROWTH_FACTOR,
            floor: float = GROWTH_FLOOR) -> BaselineDiff:
    """Diff two ``results.json`` dicts cell by cell (see the module docstring for what counts)."""
    if not (growth_factor > 1 and math.isfinite(growth_factor)):
        raise BaselineError(f"--growth-factor {growth_factor}: must be a finite number > 1")
    _validate(old, "the baseline (OLD)")
    _validate(new, "the new run (NEW)")
    before, after = _cells(old, "OLD"), _cells(new, "NEW")
    diff = BaselineDiff()
    if old.get("impl") != new.get("impl"):
        diff.notes.append(f"note: implementations differ: {old.get('impl')} -> {new.get('impl')}")
    for key in list(dict.fromkeys([*after, *before])):
        o, n = before.get(key), after.get(key)
        prop, layout = key

        def change(kind: str) -> CellChange:
            return CellChange(
                kind, prop, layout,
                None if o is None else o.verdict.value, None if n is None else n.verdict.value,
                0.0 if o is None else o.ratio, 0.0 if n is None else n.ratio,
                0 if o is None else o.examples, 0 if n is None else n.examples,
            )

        old_failing = o is not None and o.verdict.failing
        if n is not None and n.verdict.failing:
            if not old_failing:
                diff.changes.append(change("regressed"))
            elif o.verdict is not n.verdict:
                diff.changes.append(change("changed"))
            else:
                diff.unchanged += 1
            continue
        checked_now = n is not None and n.verdict is not Verdict.SKIPPED
        if old_failing:
            diff.changes.append(change("fixed" if checked_now else "dropped"))
            continue
        if o is None:
            diff.added += 1
            continue
        checked_before = o.verdict is not Verdict.SKIPPED
        if checked_before and not checked_now:
            diff.changes.append(change("dropped"))
        elif (
            checked_before
            and checked_now
            and math.isfinite(n.ratio)
            and n.ratio > floor
            and (n.ratio > growth_factor * o.ratio if math.isfinite(o.ratio) else False)
        ):
            diff.changes.append(change("grew"))
        else:
            diff.unchanged += 1
    return diff


# ---------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lora-harness report",
        description="Compare a run's results.json with a baseline's: exit 1 when a cell newly fails or its error grew.",
    )
    p.add_argument("--baseline", metavar="OLD", required=True, help="the baseline results.json, or the directory holding it")
    p.add_argument("new", metavar="NEW", help="the new results.json, or the directory holding it")
    p.add_argument(
        "--growth-factor", type=float, default=DEFAULT_GROWTH_FACTOR,
        help=f"a passing cell's worst err/tol must grow by more than this (and exceed {GROWTH_FLOOR}) to count (default {DEFAULT_GROWTH_FACTOR:g})",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lora-harness report --baseline OLD NEW``: 1 on a regression, 0 without, 2 for bad usage."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        old = load_results(args.baseline, "the baseline, --baseline OLD")
        new = load_results(args.new, "the new run, NEW")
        diff = compare(old, new, growth_factor=args.growth_factor)
    except BaselineError as e:
        print(f"lora-harness report: {e}", file=sys.stderr)
        return 2
    for line in diff.lines():
        print(line)
    return 1 if diff.has_regressions else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
