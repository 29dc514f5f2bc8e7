"""The report's view model: a ``results.json`` dict read into the cells and the run every rendering shows.

``read_run(data)`` gives a ``Run``: one ``Cell`` per (property, layout) with
its example records, the property and layout order, the verdict counts and
the failing cells. It reads leniently, since the renderings also take an old
or hand-edited ``results.json``: an unknown verdict reads as ``crash``, a
repeated cell keeps its more severe verdict, a missing field its default.
The value formatting the Markdown, the HTML page, the plot and the baseline
diff share (``fmt_ratio``, ``clip``) lives here too, once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from harness.results import Verdict, number_from_json

__all__ = ["Cell", "Run", "read_run", "verdict_of", "finding_verdict", "fmt_ratio", "clip", "first_line"]


def fmt_ratio(x: float) -> str:
    """3.1e-04 style; "inf" and "0" spelled out."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def clip(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters, an ellipsis marking the cut."""
    return text if len(text) <= n else text[: n - 1] + "…"


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped ("" if none)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def verdict_of(record: Mapping[str, Any]) -> Verdict:
    """A cell's or an example's verdict as written to JSON; an unknown one reads as ``crash``."""
    try:
        return Verdict(record.get("verdict", "pass"))
    except ValueError:
        return Verdict.CRASH


def finding_verdict(f: Mapping[str, Any]) -> Verdict:
    """A finding's verdict as written to JSON (``Finding.verdict``)."""
    return Verdict.of_finding(f.get("kind"), f.get("binding", True))


@dataclass
class Cell:
    """One property at one layout: the cell's JSON and its examples' records, in run order."""

    prop: str
    layout: str
    data: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return verdict_of(self.data)

    @property
    def examples(self) -> int:
        return int(self.data.get("examples") or 0)

    @property
    def worst_ratio(self) -> float:
        return number_from_json(self.data.get("worst_ratio", 0.0))

    @property
    def compared(self) -> bool:
        """Whether any example of the cell compared tensors (else its ratio means nothing)."""
        return any(r.get("comparisons") for r in self.records)

    @property
    def anchor(self) -> str:
        return "cell-" + "".join(c if c.isalnum() else "-" for c in f"{self.prop}--{self.layout}")

    def lead_record(self) -> Optional[dict[str, Any]]:
        """The failing example to show: the last one run (hypothesis replays the minimal example last)."""
        failing = [r for r in self.records if verdict_of(r).failing]
        if not failing:
            failing = [r for r in self.records if verdict_of(r) is Verdict.HARNESS]
        return failing[-1] if failing else None

    def lead_message(self) -> str:
        """The first failing finding of the minimal example, else the first line of the error."""
        record = self.lead_record()
        if record is not None:
            for f in record.get("findings") or []:
                if finding_verdict(f).failing:
                    return str(f.get("message", ""))
            if record.get("error"):
                return first_line(record["error"])
        return first_line(self.data.get("error") or "") or self.verdict.value


@dataclass
class Run:
    """A whole run: its JSON, its cells, and the properties and layouts in first-seen order."""

    data: dict[str, Any]
    cells: list[Cell]
    props: list[str]
    layouts: list[str]

    def cell(self, prop: str, layout: str) -> Optional[Cell]:
        return self._index.get((prop, layout))

    def __post_init__(self) -> None:
        self._index = {(c.prop, c.layout): c for c in self.cells}

    @property
    def counts(self) -> Counter:
        return Counter(c.verdict for c in self.cells)

    @property
    def failing(self) -> list[Cell]:
        """Cells to show with their minimal example: charged failures, then harness defects."""
        return [c for c in self.cells if c.verdict.failing] + [c for c in self.cells if c.verdict is Verdict.HARNESS]


def read_run(data: Mapping[str, Any]) -> Run:
    """The view model of a ``results.json`` dict."""
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data.get("examples") or []:
        records.setdefault((r.get("property", "?"), r.get("layout", "?")), []).append(r)
    cells: list[Cell] = []
    seen: dict[tuple[str, str], Cell] = {}
    for c in data.get("cells") or []:
        key = (str(c.get("property", "?")), str(c.get("layout", "?")))
        cell = Cell(key[0], key[1], dict(c), records.get(key, []))
        if key in seen:  # one cell per property and layout: keep the more severe
            if cell.verdict.severity < seen[key].verdict.severity:
                cells[cells.index(seen[key])] = cell
                seen[key] = cell
            continue
        seen[key] = cell
        cells.append(cell)
    props = list(dict.fromkeys(c.prop for c in cells))
    layouts = list(dict.fromkeys(c.layout for c in cells))
    return Run(dict(data), cells, props, layouts)
