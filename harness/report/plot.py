"""The report's plot: each example's worst error over its tolerance, per property, as an inline SVG section.

``plot_html(run)`` draws one series per property in run order on a log
scale, with the tolerance (err/tol = 1) as a dashed line, failing examples
outlined and non-finite ratios as triangles at the top; long series are
thinned to their envelope. It is hand-drawn SVG: the page loads nothing.
"""

from __future__ import annotations

import html
import math

from harness.report.model import Run, fmt_ratio, verdict_of
from harness.results import Verdict, number_from_json

__all__ = ["plot_html", "SERIES_COLOURS"]

_E = html.escape

# Observable 10: distinguishable, colour-blind-friendlier than matplotlib's defaults.
SERIES_COLOURS = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e", "#9498a0"]


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


def plot_html(run: Run, point_limit: int = 600) -> str:
    """The plot's section: legend, SVG and notes (or a note that no example compared tensors)."""
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
                ratio = number_from_json(r.get("worst_ratio"))
                pts.append((len(pts), ratio, c.layout, verdict_of(r).failing))
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

