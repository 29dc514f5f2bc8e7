"""Write a run's results: ``results.json``, a self-contained ``report.html`` and a CI ``summary.md``.

``write_report(results, directory)`` writes all three (``results.json`` first,
so a rendering problem can never cost the results). ``check_writable`` is what
the CLI calls before a long run, so that a report directory it cannot write is
found in a second rather than after an hour.

The HTML and Markdown are rendered from the ``results.json`` dict, not from
the Python objects, so they show exactly what was saved; ``render_html`` and
``render_summary`` also accept a dict loaded from an old ``results.json``.
The HTML has no scripts and loads nothing: inline CSS and an inline SVG plot.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from harness.results import SCHEMA_VERSION, RunResults, Verdict

__all__ = [
    "ReportDirectoryError",
    "check_writable",
    "write_report",
    "results_dict",
    "render_html",
    "render_summary",
    "RESULTS_JSON",
    "REPORT_HTML",
    "SUMMARY_MD",
]

RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
SUMMARY_MD = "summary.md"

SUMMARY_MAX_LINES = 60

PathLike = Union[str, "os.PathLike[str]"]


class ReportDirectoryError(OSError):
    """The report directory cannot be created or written; the message names it."""


# ---------------------------------------------------------------- files


def check_writable(directory: PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there; return it as a Path.

    Raises ``ReportDirectoryError`` (an ``OSError``) naming the path and the
    reason otherwise. Call it before a run: the results of a long run should
    not be lost to a typo in ``--report-dir``.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ReportDirectoryError(f"report directory {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportDirectoryError(f"cannot create report directory {str(path)!r}: {e.strerror or e}") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".lora-harness-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ReportDirectoryError(f"cannot write into report directory {str(path)!r}: {e.strerror or e}") from e
    return path


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the umask's permissions, unlike mkstemp's 0600
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats as strings (as results.py writes them), tuples as lists, other objects as str."""
    if isinstance(x, Verdict):
        return x.value
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


def results_dict(results: RunResults) -> dict[str, Any]:
    """``results.to_json()`` made strict-JSON safe (``json.dumps(..., allow_nan=False)`` works)."""
    return _jsonable(results.to_json())


def write_report(results: RunResults, directory: PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``report.html`` and ``summary.md`` into ``directory`` (created if needed).

    Returns ``{"json": ..., "html": ..., "markdown": ...}``: the paths written.
    """
    path = check_writable(directory)
    data = results_dict(results)
    files = {"json": path / RESULTS_JSON, "html": path / REPORT_HTML, "markdown": path / SUMMARY_MD}
    _atomic_write(files["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    _atomic_write(files["html"], render_html(data))
    _atomic_write(files["markdown"], render_summary(data))
    return files


# ---------------------------------------------------------------- model


def _ratio(value: Any) -> float:
    """A worst_ratio as written to JSON (a number, or "inf"/"nan") back to a float."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt_ratio(x: float) -> str:
    """3.1e-04 style; "inf" and "0" spelled out."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def _finding_verdict(f: Mapping[str, Any]) -> Verdict:
    if f.get("kind") == "numeric":
        return Verdict.NUMERIC
    return Verdict.CONTRACT if f.get("binding", True) else Verdict.ADVISORY


@dataclass
class _Cell:
    prop: str
    layout: str
    data: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        try:
            return Verdict(self.data.get("verdict", "pass"))
        except ValueError:
            return Verdict.CRASH

    @property
    def examples(self) -> int:
        return int(self.data.get("examples") or 0)

    @property
    def worst_ratio(self) -> float:
        return _ratio(self.data.get("worst_ratio", 0.0))

    @property
    def compared(self) -> bool:
        """Whether any example of the cell compared tensors (else its ratio means nothing)."""
        return any(r.get("comparisons") for r in self.records)

    @property
    def anchor(self) -> str:
        return "cell-" + "".join(c if c.isalnum() else "-" for c in f"{self.prop}--{self.layout}")

    def lead_record(self) -> Optional[dict[str, Any]]:
        """The failing example to show: the last one run (hypothesis replays the minimal example last)."""
        failing = [r for r in self.records if _verdict_of(r).failing]
        if not failing:
            failing = [r for r in self.records if _verdict_of(r) is Verdict.HARNESS]
        return failing[-1] if failing else None

    def lead_message(self) -> str:
        """The first failing finding of the minimal example, else the first line of the error."""
        record = self.lead_record()
        if record is not None:
            for f in record.get("findings") or []:
                if _finding_verdict(f).failing:
                    return str(f.get("message", ""))
            if record.get("error"):
                return _first_line(record["error"])
        return _first_line(self.data.get("error") or "") or self.verdict.value


def _verdict_of(record: Mapping[str, Any]) -> Verdict:
    try:
        return Verdict(record.get("verdict", "pass"))
    except ValueError:
        return Verdict.CRASH


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass
class _Run:
    data: dict[str, Any]
    cells: list[_Cell]
    props: list[str]
    layouts: list[str]

    def cell(self, prop: str, layout: str) -> Optional[_Cell]:
        return self._index.get((prop, layout))

    def __post_init__(self) -> None:
        self._index = {(c.prop, c.layout): c for c in self.cells}

    @property
    def counts(self) -> Counter:
        return Counter(c.verdict for c in self.cells)

    @property
    def failing(self) -> list[_Cell]:
        """Cells to show with their minimal example: charged failures, then harness defects."""
        return [c for c in self.cells if c.verdict.failing] + [c for c in self.cells if c.verdict is Verdict.HARNESS]


def _model(data: Mapping[str, Any]) -> _Run:
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data.get("examples") or []:
        records.setdefault((r.get("property", "?"), r.get("layout", "?")), []).append(r)
    cells: list[_Cell] = []
    seen: dict[tuple[str, str], _Cell] = {}
    for c in data.get("cells") or []:
        key = (str(c.get("property", "?")), str(c.get("layout", "?")))
        cell = _Cell(key[0], key[1], dict(c), records.get(key, []))
        if key in seen:  # one cell per property and layout: keep the more severe
            if cell.verdict.severity < seen[key].verdict.severity:
                cells[cells.index(seen[key])] = cell
                seen[key] = cell
            continue
        seen[key] = cell
        cells.append(cell)
    props = list(dict.fromkeys(c.prop for c in cells))
    layouts = list(dict.fromkeys(c.layout for c in cells))
    return _Run(dict(data), cells, props, layouts)


def _totals_phrase(run: _Run) -> str:
    counts = run.counts
    failed = sum(n for v, n in counts.items() if v.failing)
    kinds = ", ".join(f"{v.value} {counts[v]}" for v in Verdict if v.failing and counts[v])
    parts = [f"{counts[Verdict.PASS]} passed", f"{failed} failed" + (f" ({kinds})" if kinds else "")]
    if counts[Verdict.HARNESS]:
        parts.append(f"{counts[Verdict.HARNESS]} harness defect(s), not charged")
    if counts[Verdict.ADVISORY]:
        parts.append(f"{counts[Verdict.ADVISORY]} advisory")
    if counts[Verdict.VACUOUS]:
        parts.append(f"{counts[Verdict.VACUOUS]} vacuous")
    if counts[Verdict.SKIPPED]:
        parts.append(f"{counts[Verdict.SKIPPED]} skipped")
    return ", ".join(parts)


# ---------------------------------------------------------------- summary.md


def _md_escape(text: str) -> str:
    """Escape what Markdown would format in a one-line message (and keep it one line)."""
    text = " ".join(str(text).split())
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def _md_code_block(text: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + "sh", *str(text).splitlines(), fence]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def render_summary(data: Mapping[str, Any], *, max_lines: int = SUMMARY_MAX_LINES) -> str:
    """A short Markdown summary for a CI comment (at most about ``max_lines`` lines)."""
    run = _model(data)
    impl = data.get("impl", "?")
    lines: list[str] = []
    head = f"**lora-harness**: {_totals_phrase(run)} — impl {impl}"
    if data.get("interrupted"):
        head = "**INTERRUPTED** " + head
    lines.append(head)
    lines.append("")

    max_rows, max_cols = 20, 6
    props, layouts = run.props[:max_rows], run.layouts[:max_cols]
    if props and layouts:
        lines.append("| property | " + " | ".join(f"`{l}`" for l in layouts) + " |")
        lines.append("|---|" + "---|" * len(layouts))
        for p in props:
            words = []
            for l in layouts:
                c = run.cell(p, l)
                word = "—" if c is None else c.verdict.value
                words.append(f"**{word}**" if c is not None and c.verdict.failing else word)
            lines.append(f"| {_md_escape(p)} | " + " | ".join(words) + " |")
        hidden = []
        if len(run.props) > max_rows:
            hidden.append(f"{len(run.props) - max_rows} more properties")
        if len(run.layouts) > max_cols:
            hidden.append(f"{len(run.layouts) - max_cols} more layouts")
        if hidden:
            lines.append("")
            lines.append(f"_Table truncated: {' and '.join(hidden)} not shown; see report.html._")
    else:
        lines.append("_No property was run._")

    failing = run.failing
    if failing:
        lines.append("")
        lines.append("**Failures**")
        shown = 0
        for cell in failing:
            block = ["", f"- **{_md_escape(cell.prop)}** at `{cell.layout}` ({cell.verdict.value}): "
                     f"{_md_escape(_clip(cell.lead_message(), 300))}"]
            if cell.data.get("replay_command"):
                block += _md_code_block(str(cell.data["replay_command"]))
            if len(lines) + len(block) + 2 > max_lines:
                break
            lines += block
            shown += 1
        if shown < len(failing):
            lines.append("")
            lines.append(f"_…and {len(failing) - shown} more failing cells: see report.html._")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report.html

_E = html.escape

VERDICT_LABEL = {
    Verdict.PASS: "pass",
    Verdict.NUMERIC: "numeric",
    Verdict.CONTRACT: "contract",
    Verdict.ADVISORY: "advisory",
    Verdict.CRASH: "crash",
    Verdict.HANG: "hang",
    Verdict.HARNESS: "harness",
    Verdict.VACUOUS: "vacuous",
    Verdict.SKIPPED: "skipped",
}

VERDICT_MEANING = {
    Verdict.PASS: "every example within tolerance",
    Verdict.NUMERIC: "wrong outputs or gradients",
    Verdict.CONTRACT: "a promised SPEC behaviour broken",
    Verdict.ADVISORY: "stricter SPEC point outside the declared contract (not failing)",
    Verdict.CRASH: "a rank raised or died",
    Verdict.HANG: "a rank did not finish in time",
    Verdict.HARNESS: "a defect of lora-harness: the known-good control implementation fails the example too (not charged)",
    Verdict.VACUOUS: "nothing to check in any example (no adapter, no dropout call, no power to decide): not a pass",
    Verdict.SKIPPED: "not run (outside the capabilities)",
}

# Observable 10: distinguishable, colour-blind-friendlier than matplotlib's defaults.
SERIES_COLOURS = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e", "#9498a0"]

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--card:#fff;
--pass-bg:#d3f5dc;--pass-fg:#0f5323;--numeric-bg:#d1242f;--contract-bg:#e8730c;--advisory-bg:#f7d54a;--advisory-fg:#3d3000;
--crash-bg:#8250df;--hang-bg:#6e0b1c;--skipped-bg:#e6e9ed;--skipped-fg:#59636e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1320px;margin:0 auto;padding:24px 28px 56px}
h1{font-size:22px;margin:0;font-weight:650}
h2{font-size:16px;margin:0 0 12px;font-weight:650}
h3{font-size:14px;margin:0;font-weight:650}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
pre{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:10px 12px;margin:6px 0 12px;overflow:auto;max-height:340px;white-space:pre-wrap;word-break:break-word}
section,header.top{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:0 0 16px}
header.top{border-left:6px solid var(--pass-fg)}
header.top.failed{border-left-color:var(--numeric-bg)}
header.top.interrupted{border-left-color:var(--hang-bg)}
.title{display:flex;align-items:baseline;gap:14px;flex-wrap:wrap}
.status{font-weight:700;letter-spacing:.04em;font-size:13px;padding:2px 10px;border-radius:999px;background:var(--pass-bg);color:var(--pass-fg)}
.failed .status{background:var(--numeric-bg);color:#fff}
.interrupted .status{background:var(--hang-bg);color:#fff}
.sub{color:var(--muted);margin:6px 0 0}
.totals{display:flex;flex-wrap:wrap;gap:8px;margin:14px 0 4px}
.chip{display:inline-flex;align-items:center;gap:6px;padding:3px 10px;border-radius:999px;font-size:13px;font-weight:600}
.chip b{font-size:15px}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:12px 0 0}
.facts dt{color:var(--muted)}
.facts dd{margin:0}
.caps{display:flex;flex-wrap:wrap;gap:6px}
.cap{border:1px solid var(--line);border-radius:6px;padding:1px 8px;font-size:12.5px;background:var(--bg)}
.cap i{font-style:normal;color:var(--muted)}
.cap.off{color:var(--muted);text-decoration:line-through}
ul.skipped{margin:4px 0 0;padding-left:18px;color:var(--muted)}
.scroll{overflow-x:auto}
table.matrix{border-collapse:separate;border-spacing:4px}
table.matrix th{font-weight:600;font-size:12.5px;color:var(--muted);padding:4px 8px;white-space:nowrap}
table.matrix thead th:first-child{text-align:left;font-family:inherit}
table.matrix .hint{display:block;font-weight:400;font-size:11px;color:var(--muted)}
table.matrix thead th{text-align:center;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-weight:500;font-size:11.5px;vertical-align:bottom}
table.matrix tbody th{text-align:left;color:var(--fg);font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-weight:500;padding-right:14px}
td.cell{min-width:118px;padding:7px 10px;white-space:nowrap;border-radius:7px;text-align:center;vertical-align:middle;line-height:1.3}
td.cell a{color:inherit;text-decoration:none;display:block}
td.cell .verdict{display:block;font-weight:700;font-size:12px;letter-spacing:.05em;text-transform:uppercase}
td.cell .meta{display:block;font-size:12px;font-variant-numeric:tabular-nums;opacity:.92}
td.cell a:hover{text-decoration:underline}
.v-pass{background:var(--pass-bg);color:var(--pass-fg)}
.v-numeric{background:var(--numeric-bg);color:#fff}
.v-contract{background:var(--contract-bg);color:#fff}
.v-advisory{background:var(--advisory-bg);color:var(--advisory-fg)}
.v-crash{background:var(--crash-bg);color:#fff}
.v-hang{background:var(--hang-bg);color:#fff}
.v-skipped{background:var(--skipped-bg);color:var(--skipped-fg)}
.v-harness{background:#5b3a8c;color:#fff}
.v-vacuous{background:var(--skipped-bg);color:var(--skipped-fg);border:1px dashed var(--line)}
td.v-none{background:transparent;border:1px dashed var(--line);color:var(--muted)}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:10px 0 0;font-size:12.5px;color:var(--muted)}
.legend span.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-2px}
.note{color:var(--muted);font-size:12.5px;margin:8px 0 0}
svg.plot{width:100%;height:auto;display:block}
svg.plot text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#59636e}
svg.plot .grid{stroke:#eaeef2;stroke-width:1}
svg.plot .axis{stroke:#8c959f;stroke-width:1}
svg.plot .tol{stroke:#d1242f;stroke-width:1.5;stroke-dasharray:6 4}
svg.plot text.tol-label{fill:#d1242f;font-weight:600}
.failure{border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:0 0 14px;border-left-width:6px}
.failure.v-numeric,.failure.v-contract,.failure.v-crash,.failure.v-hang{background:var(--card);color:var(--fg)}
.failure.v-numeric{border-left-color:var(--numeric-bg)}
.failure.v-contract{border-left-color:var(--contract-bg)}
.failure.v-crash{border-left-color:var(--crash-bg)}
.failure.v-hang{border-left-color:var(--hang-bg)}
.failure .body{display:grid;grid-template-columns:minmax(0,1.25fr) minmax(0,1fr);gap:0 20px}
@media (max-width:900px){.failure .body{grid-template-columns:minmax(0,1fr)}}
.failure .head{display:flex;align-items:center;gap:10px;flex-wrap:wrap;margin-bottom:6px}
.badge{font-size:11.5px;font-weight:700;letter-spacing:.05em;text-transform:uppercase;padding:1px 8px;border-radius:999px}
.label{font-size:12px;color:var(--muted);font-weight:600;margin:8px 0 0;text-transform:uppercase;letter-spacing:.04em}
ul.findings{margin:4px 0 6px;padding-left:18px}
ul.findings li{margin:2px 0}
details summary{cursor:pointer;color:var(--muted);font-size:12.5px;margin:4px 0}
table.env{border-collapse:collapse;font-size:13px}
table.env th{text-align:left;color:var(--muted);font-weight:500;padding:3px 24px 3px 0;white-space:nowrap;vertical-align:top}
table.env td{padding:3px 0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;word-break:break-all}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:18px}
"""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _badge(v: Verdict) -> str:
    return f'<span class="badge v-{v.value}">{_E(VERDICT_LABEL[v])}</span>'


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join("model dtype" if v is None else str(v) for v in value) or "none"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _caps_html(caps: Mapping[str, Any]) -> str:
    items = []
    for key, value in caps.items():
        if key == "contract":
            continue
        if isinstance(value, bool):
            items.append(f'<span class="cap{"" if value else " off"}" title="{_E(key)}: {_value_text(value)}">{_E(key)}</span>')
        else:
            items.append(f'<span class="cap"><i>{_E(key)}:</i> {_E(_value_text(value))}</span>')
    return '<div class="caps">' + "".join(items) + "</div>" if items else "—"


def _header_html(run: _Run) -> str:
    d = run.data
    failed = bool(run.failing)
    interrupted = bool(d.get("interrupted"))
    if interrupted:
        cls, status = "interrupted", "INTERRUPTED"
    elif failed:
        cls, status = "failed", "FAILED"
    else:
        cls, status = "passed", "PASSED"
    counts = run.counts
    chips = "".join(
        f'<span class="chip v-{v.value}" title="{_E(VERDICT_MEANING[v])}"><b>{counts[v]}</b>{_E(VERDICT_LABEL[v])}</span>'
        for v in [Verdict.PASS, Verdict.NUMERIC, Verdict.CONTRACT, Verdict.CRASH, Verdict.HANG, Verdict.HARNESS,
                  Verdict.ADVISORY, Verdict.VACUOUS, Verdict.SKIPPED]
        if counts[v] or v is Verdict.PASS
    )
    caps = d.get("capabilities") or {}
    sub = []
    if d.get("started"):
        sub.append(f"started {_E(str(d['started']))}")
    try:
        sub.append(f"{float(d.get('seconds') or 0):.1f} s")
    except (TypeError, ValueError):
        pass
    total_examples = sum(c.examples for c in run.cells)
    sub.append(f"{len(run.cells)} cells ({len(run.props)} properties × {len(run.layouts)} layouts), {total_examples} examples")

    skipped = [str(s) for s in d.get("skipped") or []]
    skipped += [
        f"{c.prop} at {c.layout}: {c.data.get('skipped_reason') or 'skipped'}" for c in run.cells if c.verdict is Verdict.SKIPPED
    ]
    skipped_html = (
        '<ul class="skipped">' + "".join(f"<li>{_E(s)}</li>" for s in skipped) + "</ul>" if skipped else "nothing"
    )
    facts = [
        ("contract", f'<code>{_E(str(caps.get("contract", "?")))}</code>'),
        ("capabilities", _caps_html(caps)),
        ("skipped", skipped_html),
    ]
    if d.get("command"):
        facts.append(("command", f'<code>{_E(str(d["command"]))}</code>'))
    facts_html = "".join(f"<dt>{_E(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        f'<header class="top {cls}"><div class="title"><h1>lora-harness report — <code>{_E(str(d.get("impl", "?")))}</code></h1>'
        f'<span class="status">{status}</span></div>'
        f'<p class="sub">{" · ".join(sub)}</p>'
        f'<div class="totals">{chips}</div>'
        f'<dl class="facts">{facts_html}</dl></header>'
    )


def _matrix_html(run: _Run) -> str:
    head = '<tr><th>property <span class="hint">examples · worst err/tol</span></th>' + "".join(f'<th scope="col">{_E(l)}</th>' for l in run.layouts) + "</tr>"
    rows = []
    for p in run.props:
        tds = []
        for l in run.layouts:
            c = run.cell(p, l)
            if c is None:
                tds.append(f'<td class="cell v-none" data-property="{_E(p)}" data-layout="{_E(l)}">'
                           '<span class="verdict">not run</span></td>')
                continue
            v = c.verdict
            if v is Verdict.SKIPPED:
                reason = str(c.data.get("skipped_reason") or "skipped")
                meta = f'<span class="meta">{_E(_clip(reason, 40))}</span>'
                title = reason
            else:
                ratio = fmt_ratio(c.worst_ratio) if c.compared else "no tensors compared"
                meta = f'<span class="meta">{c.examples} ex · {_E(ratio)}</span>'
                title = VERDICT_MEANING[v] + (f": {c.lead_message()}" if v.failing or v in (Verdict.ADVISORY, Verdict.HARNESS) else "")
                if c.compared:
                    title += f" (worst err/tol {fmt_ratio(c.worst_ratio)} over {_plural(c.examples, 'example')})"
            inner = f'<span class="verdict">{_E(VERDICT_LABEL[v])}</span>{meta}'
            if v.failing or v in (Verdict.ADVISORY, Verdict.HARNESS):
                inner = f'<a href="#{c.anchor}">{inner}</a>'
            cls = f"cell v-{v.value}" + (" failing" if v.failing else "")
            tds.append(
                f'<td class="{cls}" data-verdict="{v.value}" data-property="{_E(p)}" data-layout="{_E(l)}" '
                f'title="{_E(_clip(title, 400))}">{inner}</td>'
            )
        rows.append(f'<tr><th scope="row">{_E(p)}</th>{"".join(tds)}</tr>')
    legend = "".join(
        f'<span><span class="sw v-{v.value}"></span>{_E(VERDICT_LABEL[v])}: {_E(VERDICT_MEANING[v])}</span>' for v in Verdict
    )
    return (
        '<section><h2>Properties × layouts</h2><div class="scroll">'
        f'<table id="matrix" class="matrix"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
        '<p class="note">Each cell: verdict, number of examples, and the worst error relative to its tolerance over '
        "those examples (err/tol &lt; 1 passes). Failing cells link to their minimal example below.</p>"
        f'<div class="legend">{legend}</div></section>'
    )


# -- plot ---------------------------------------------------------------


def _nice_step(span: float, target: int = 8) -> int:
    raw = max(span / target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return int(m * mag)
    return int(10 * mag)


def _downsample(points: list[tuple[int, float, str, bool]], limit: int) -> list[tuple[int, float, str, bool]]:
    """Keep at most ``limit`` points: the largest ratio of each bucket (the envelope is what matters)."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / limit)
    out = []
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        out.append(max(bucket, key=lambda p: (p[3], p[1] if not math.isnan(p[1]) else -1.0)))
    return out


def _plot_html(run: _Run, point_limit: int = 600) -> str:
    series: dict[str, list[tuple[int, float, str, bool]]] = {}
    uncompared: list[str] = []
    for p in run.props:
        pts: list[tuple[int, float, str, bool]] = []
        for c in run.cells:
            if c.prop != p:
                continue
            for r in c.records:
                if not r.get("comparisons"):
                    continue
                ratio = _ratio(r.get("worst_ratio"))
                pts.append((len(pts), ratio, c.layout, _verdict_of(r).failing))
        if pts:
            series[p] = pts
        elif any(c.prop == p and c.verdict is not Verdict.SKIPPED for c in run.cells):
            uncompared.append(p)
    if not series:
        note = "No example compared tensors, so there is nothing to plot."
        return f'<section><h2>Error / tolerance per example</h2><p class="note">{_E(note)}</p></section>'

    values = [v for pts in series.values() for _, v, _, _ in pts]
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    hi = max(0, math.ceil(math.log10(max(finite)))) + 1 if finite else 1
    lo = min(math.floor(math.log10(min(finite))), hi - 3) if finite else -4
    lo = max(lo, -20)
    n_max = max(len(pts) for pts in series.values())

    W, H = 1000, 360
    L, R, T, B = 62, 18, 16, 44
    pw, ph = W - L - R, H - T - B

    def xpos(i: int) -> float:
        return L + (pw / 2 if n_max <= 1 else pw * i / (n_max - 1))

    def ypos(v: float) -> float:
        if math.isnan(v) or v == math.inf:
            return T
        if v <= 0:
            return T + ph
        e = min(max(math.log10(v), lo), hi)
        return T + ph * (hi - e) / (hi - lo)

    parts = [f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-label="error over tolerance per example, log scale">']
    every = 1 if hi - lo <= 10 else 2 if hi - lo <= 20 else 4
    for e in range(lo, hi + 1):
        y = ypos(10.0**e)
        parts.append(f'<line class="grid" x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}"/>')
        if e % every == 0:
            label = "1" if e == 0 else f"1e{e}"
            parts.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    step = _nice_step(max(n_max - 1, 1))
    for i in range(0, max(n_max, 1), step):
        x = xpos(i)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{T + ph}" y2="{T + ph + 4}"/>')
        parts.append(f'<text x="{x:.1f}" y="{T + ph + 17}" text-anchor="middle">{i}</text>')
    parts.append(f'<line class="axis" x1="{L}" x2="{L}" y1="{T}" y2="{T + ph}"/>')
    parts.append(f'<line class="axis" x1="{L}" x2="{W - R}" y1="{T + ph}" y2="{T + ph}"/>')
    parts.append(f'<text x="{L + pw / 2:.0f}" y="{H - 6}" text-anchor="middle">example (per property, in run order)</text>')
    parts.append(f'<text x="14" y="{T + ph / 2:.0f}" text-anchor="middle" transform="rotate(-90 14 {T + ph / 2:.0f})">worst error / tolerance</text>')

    legend = []
    downsampled = False
    for k, (p, pts) in enumerate(series.items()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        shown = _downsample(pts, point_limit)
        downsampled |= len(shown) < len(pts)
        g = [f'<g class="series" data-property="{_E(p)}">']
        segments: list[list[tuple[int, float]]] = []
        last_layout = None
        for i, v, layout, _ in shown:  # one line per layout: examples of different layouts are not a sequence
            if layout != last_layout:
                segments.append([])
                last_layout = layout
            segments[-1].append((i, v))
        for seg in segments if len(shown) <= 120 else []:  # lines only help while the points are sparse
            if len(seg) > 1:
                coords = " ".join(f"{xpos(i):.1f},{ypos(v):.1f}" for i, v in seg)
                g.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.2" stroke-opacity="0.45"/>')
        radius, fade = ("2.8", "") if len(shown) <= 120 else ("2", ' fill-opacity="0.7"')
        for i, v, layout, failing in shown:
            x, y = xpos(i), ypos(v)
            tip = _E(f"{p} at {layout}, example {i}: err/tol {fmt_ratio(v)}")
            if math.isinf(v) or math.isnan(v):
                g.append(f'<path d="M{x:.1f},{y - 1:.1f} l-5,9 h10 z" fill="{colour}" stroke="#1f2328" stroke-width="0.8"><title>{tip}</title></path>')
            elif failing:
                g.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.2" fill="{colour}" stroke="#1f2328" stroke-width="1.2"><title>{tip}</title></circle>')
            else:
                g.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}"{fade}><title>{tip}</title></circle>')
        g.append("</g>")
        parts += g
        legend.append(f'<span><span class="sw" style="background:{colour}"></span>{_E(p)} ({len(pts)})</span>')
    # Tolerance line last so it is on top.
    y1 = ypos(1.0)
    parts.append(f'<line class="tol" x1="{L}" x2="{W - R}" y1="{y1:.1f}" y2="{y1:.1f}"/>')
    parts.append(f'<text class="tol-label" x="{W - R - 4}" y="{y1 - 6:.1f}" text-anchor="end">tolerance (err/tol = 1)</text>')
    parts.append("</svg>")

    notes = ["Log scale; points above the dashed line failed. Outlined points are failing examples; "
             "a ratio of exactly 0 sits on the bottom axis, an infinite one (NaN or missing tensor) is a triangle at the top."]
    if downsampled:
        notes.append(f"Long series are thinned to {point_limit} points, keeping the largest ratio of each run of examples.")
    if uncompared:
        notes.append("Not plotted (no tensor comparisons): " + ", ".join(uncompared) + ".")
    return (
        '<section><h2>Error / tolerance per example</h2>'
        f'<div class="legend" style="margin:0 0 8px">{"".join(legend)}</div>'
        + "".join(parts)
        + "".join(f'<p class="note">{_E(n)}</p>' for n in notes)
        + "</section>"
    )


# -- failures -----------------------------------------------------------


def _findings_html(findings: Iterable[Mapping[str, Any]]) -> str:
    items = []
    for f in findings:
        v = _finding_verdict(f)
        check = f" <code>{_E(str(f['check']))}</code>" if f.get("check") else ""
        items.append(f"<li>{_badge(v)}{check} {_E(str(f.get('message', '')))}</li>")
    return f'<ul class="findings">{"".join(items)}</ul>' if items else ""


def _failure_html(cell: _Cell) -> str:
    """One failing cell: findings, error, replay command (left); the minimal example (right)."""
    d = cell.data
    record = cell.lead_record()
    head = (
        f'<div class="head">{_badge(cell.verdict)}<h3><code>{_E(cell.prop)}</code> at <code>{_E(cell.layout)}</code></h3>'
        f'<span class="note" style="margin:0">{_plural(cell.examples, "example")}'
        + (f" · worst err/tol {_E(fmt_ratio(cell.worst_ratio))}" if cell.compared else "")
        + "</span></div>"
    )
    left: list[str] = []
    if record is not None and record.get("findings"):
        left.append('<div class="label">Findings on the minimal example</div>')
        left.append(_findings_html(record["findings"]))
    error = d.get("error") or (record or {}).get("error") or ""
    if error:
        left.append('<div class="label">Error</div>')
        left.append(f'<pre class="error">{_E(str(error))}</pre>')
    if d.get("replay_command"):
        left.append('<div class="label">Replay</div>')
        left.append(f'<pre class="replay">{_E(str(d["replay_command"]))}</pre>')
    extras = []
    if d.get("falsifying_example"):
        extras.append(("Hypothesis report", str(d["falsifying_example"])))
    if d.get("regression_file"):
        extras.append(("Regression file", str(d["regression_file"])))
    for rank, text in sorted(((record or {}).get("rank_output") or {}).items(), key=lambda kv: str(kv[0])):
        if text:
            extras.append((f"Output of rank {rank}", str(text)))
    for title, text in extras:
        left.append(f"<details><summary>{_E(title)}</summary><pre>{_E(text)}</pre></details>")
    right: list[str] = []
    case = d.get("minimal_case") if d.get("minimal_case") is not None else (record or {}).get("case")
    if case:
        right.append('<div class="label">Minimal failing example</div>')
        right.append(f'<pre class="case">{_E(json.dumps(case, indent=2, sort_keys=True))}</pre>')
    body = (f'<div class="body"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>' if right
            else "".join(left))
    return f'<div class="failure v-{cell.verdict.value}" id="{cell.anchor}">{head}{body}</div>'


def _advisories_html(run: _Run) -> str:
    cells = [c for c in run.cells if c.verdict is Verdict.ADVISORY]
    if not cells:
        return ""
    items = []
    for c in cells:
        messages: dict[str, None] = {}
        for r in c.records:
            for f in r.get("findings") or []:
                if _finding_verdict(f) is Verdict.ADVISORY:
                    messages.setdefault(str(f.get("message", "")), None)
        text = "; ".join(list(messages)[:3]) or c.lead_message()
        items.append(f'<li id="{c.anchor}"><code>{_E(c.prop)}</code> at <code>{_E(c.layout)}</code>: {_E(text)}</li>')
    return (
        "<section><h2>Advisories</h2><p class=\"note\" style=\"margin:0 0 6px\">Points where SPEC is stricter than the "
        "contract the implementation declared: reported, never failing.</p>"
        f'<ul class="findings">{"".join(items)}</ul></section>'
    )


def _environment_html(env: Mapping[str, Any]) -> str:
    if not env:
        return ""
    rows = "".join(f"<tr><th>{_E(str(k))}</th><td>{_E(_value_text(v))}</td></tr>" for k, v in env.items())
    return f'<section><h2>Environment</h2><table class="env" id="environment">{rows}</table></section>'


def render_html(data: Mapping[str, Any]) -> str:
    """The self-contained HTML report for a ``results.json`` dict."""
    run = _model(data)
    failing = run.failing
    failures = (
        "<section><h2>Failures</h2>" + "".join(_failure_html(c) for c in failing) + "</section>" if failing else ""
    )
    title = f"lora-harness: {data.get('impl', '?')} — {'FAILED' if failing else 'passed'}"
    version = (data.get("environment") or {}).get("lora-harness")
    footer = f"lora-harness{' ' + str(version) if version else ''} · results schema v{data.get('schema_version', SCHEMA_VERSION)}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_E(title)}</title><style>{CSS}</style></head><body><main>"
        + _header_html(run)
        + _matrix_html(run)
        + _plot_html(run)
        + failures
        + _advisories_html(run)
        + _environment_html(data.get("environment") or {})
        + f"<footer>{_E(footer)}</footer>"
        + "</main></body></html>\n"
    )
