"""Reports of a run: ``results.json``, a self-contained ``report.html``, a CI ``summary.md``, and baseline diffs.

* ``collect_environment(impl)``: versions and machine facts (``environment``);
* ``check_writable(directory)`` / ``write_report(results, directory)``: the files (``writer``);
* ``render_html(data)``: the page (``page``, with its ``report.css`` and the ``plot``);
* ``render_summary(data)``: the Markdown (``summary``);
* both read a ``results.json`` dict through one view model (``model``);
* ``compare(old, new)`` and ``lora-harness report --baseline OLD NEW`` (``baseline``).

Names are imported lazily, so ``harness.report.environment`` alone imports
neither torch nor megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "collect_environment": "environment",
    "check_writable": "writer",
    "write_report": "writer",
    "render_html": "page",
    "render_summary": "summary",
    "ReportDirectoryError": "writer",
    "compare": "baseline",
    "load_results": "baseline",
    "BaselineDiff": "baseline",
    "BaselineError": "baseline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
