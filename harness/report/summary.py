"""The Markdown summary of a run (``summary.md``): a short CI comment rendered from a ``results.json`` dict.

One headline with the verdict counts, the property x layout table (at most
20 properties and 6 layouts), then each failing cell's message and replay
command, cut off at about ``SUMMARY_MAX_LINES`` lines with a note saying
what was left out.
"""

from __future__ import annotations

from typing import Any, Mapping

from harness.report.model import Run, clip, read_run
from harness.results import Verdict

__all__ = ["SUMMARY_MAX_LINES", "render_summary"]

SUMMARY_MAX_LINES = 60


def _totals_phrase(run: Run) -> str:
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


def render_summary(data: Mapping[str, Any], *, max_lines: int = SUMMARY_MAX_LINES) -> str:
    """A short Markdown summary for a CI comment (at most about ``max_lines`` lines)."""
    run = read_run(data)
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
                     f"{_md_escape(clip(cell.lead_message(), 300))}"]
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

