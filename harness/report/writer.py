"""Write a run's report files: ``results.json``, ``report.html`` and ``summary.md``, safely.

``write_report(results, directory)`` writes all three, each through a
temporary file and a rename, ``results.json`` first so a rendering problem
can never cost the results. ``check_writable`` is what the CLI and the pytest
plugin call before a long run, so that a report directory that cannot be
written is found in a second rather than after an hour. ``results_dict`` /
``results_text`` are the strict-JSON ``results.json`` (also what ``--json``
writes).

What the files say is not decided here: the page is ``harness.report.page``
(with the plot, ``harness.report.plot``), the summary
``harness.report.summary``, both rendered from the ``results.json`` dict
read by ``harness.report.model``, so they show exactly what was saved.
``render_html`` and ``render_summary`` are re-exported from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

from harness.report.page import render_html
from harness.report.summary import SUMMARY_MAX_LINES, render_summary
from harness.results import RunResults, Verdict, json_number
from harness.errors import ReportDirectoryError

__all__ = [
    "ReportDirectoryError",
    "check_writable",
    "write_report",
    "results_dict",
    "results_text",
    "render_html",
    "render_summary",
    "RESULTS_JSON",
    "REPORT_HTML",
    "SUMMARY_MD",
    "SUMMARY_MAX_LINES",
]

RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
SUMMARY_MD = "summary.md"

PathLike = Union[str, "os.PathLike[str]"]


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
        return json_number(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


def results_dict(results: RunResults) -> dict[str, Any]:
    """``results.to_json()`` made strict-JSON safe (``json.dumps(..., allow_nan=False)`` works)."""
    return _jsonable(results.to_json())


def results_text(data: Mapping[str, Any]) -> str:
    """The text of ``results.json`` for a ``results_dict``: indented strict JSON and a final newline."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_report(results: RunResults, directory: PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``report.html`` and ``summary.md`` into ``directory`` (created if needed).

    Returns ``{"json": ..., "html": ..., "markdown": ...}``: the paths written.
    """
    path = check_writable(directory)
    data = results_dict(results)
    files = {"json": path / RESULTS_JSON, "html": path / REPORT_HTML, "markdown": path / SUMMARY_MD}
    _atomic_write(files["json"], results_text(data))
    _atomic_write(files["html"], render_html(data))
    _atomic_write(files["markdown"], render_summary(data))
    return files
