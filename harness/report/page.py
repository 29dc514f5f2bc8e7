"""The HTML page of a run (``report.html``): one self-contained file rendered from a ``results.json`` dict.

``render_html(data)`` lays out the header (status, counts, contract,
capabilities, what was skipped), the property x layout matrix, the plot
(``harness.report.plot``), each failing cell with its minimal example, the
advisories and the environment. No scripts and nothing loaded: the
stylesheet (``report.css``, shipped with the package) is inlined.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
from typing import Any, Iterable, Mapping

from harness.report.model import Cell, Run, clip, finding_verdict, fmt_ratio, read_run
from harness.report.plot import plot_html
from harness.results import SCHEMA_VERSION, Verdict

__all__ = ["render_html", "stylesheet", "VERDICT_LABEL", "VERDICT_MEANING"]

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


@functools.lru_cache(maxsize=1)
def stylesheet() -> str:
    """The page's CSS: ``report.css`` next to this module (package data, read once)."""
    return importlib.resources.files(__package__).joinpath("report.css").read_text(encoding="utf-8")


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


def _header_html(run: Run) -> str:
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


def _matrix_html(run: Run) -> str:
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
                meta = f'<span class="meta">{_E(clip(reason, 40))}</span>'
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
                f'title="{_E(clip(title, 400))}">{inner}</td>'
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


def _findings_html(findings: Iterable[Mapping[str, Any]]) -> str:
    items = []
    for f in findings:
        v = finding_verdict(f)
        check = f" <code>{_E(str(f['check']))}</code>" if f.get("check") else ""
        items.append(f"<li>{_badge(v)}{check} {_E(str(f.get('message', '')))}</li>")
    return f'<ul class="findings">{"".join(items)}</ul>' if items else ""


def _failure_html(cell: Cell) -> str:
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


def _advisories_html(run: Run) -> str:
    cells = [c for c in run.cells if c.verdict is Verdict.ADVISORY]
    if not cells:
        return ""
    items = []
    for c in cells:
        messages: dict[str, None] = {}
        for r in c.records:
            for f in r.get("findings") or []:
                if finding_verdict(f) is Verdict.ADVISORY:
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
    run = read_run(data)
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
        f"<title>{_E(title)}</title><style>\n{stylesheet()}</style></head><body><main>"
        + _header_html(run)
        + _matrix_html(run)
        + plot_html(run)
        + failures
        + _advisories_html(run)
        + _environment_html(data.get("environment") or {})
        + f"<footer>{_E(footer)}</footer>"
        + "</main></body></html>\n"
    )
