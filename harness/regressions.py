"""Failing examples stored as plain JSON and replayed on every later run, independently of hypothesis's database.

A ``RegressionStore`` is a directory the user names (the project's own is
``tests/regressions/``). Each file holds one case that failed one property
at one layout; ``cases(prop, layout)`` yields them for replay before any new
example is drawn.

The store is input, not evidence: ``validate()`` reads every ``*.json`` file
in it and raises ``ValueError`` naming the first file that is not valid JSON,
not a regression file (another schema, a version this code does not read), or
lacks a field or holds a case that does not parse or fit its layout. Front
ends call it before any rank starts, so a truncated or foreign file is one
usage error, never a silently skipped or misread regression.

A store opened with ``writable=False`` is replayed but never written:
``save`` returns None (the pytest plugin opens the project's own store that
way when another implementation is under test).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from harness.cases import case_from_json

__all__ = [
    "RegressionStore",
    "REGRESSION_SCHEMA",
    "REGRESSION_VERSIONS",
    "check_regression",
    "read_regression_file",
    "open_store",
]

REGRESSION_SCHEMA = "lora-harness-regression"
#: Versions of the regression file format this code reads (``save`` writes the last).
REGRESSION_VERSIONS = (1,)
#: Fields every regression file has (``save`` also writes found_with_impl, found, verdict, error).
REQUIRED_FIELDS = ("schema", "version", "property", "layout", "case")


def check_regression(data: Any, name: str) -> Any:
    """The case of a regression file's data, or ``ValueError`` naming ``name``, the field and the rule."""
    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ValueError(f"{name}: holds {kind}, not a regression file (a JSON object with \"schema\": \"{REGRESSION_SCHEMA}\")")
    if data.get("schema") != REGRESSION_SCHEMA:
        raise ValueError(
            f"{name}: \"schema\" is {data.get('schema')!r}, not {REGRESSION_SCHEMA!r}: not a lora-harness regression file "
            "(a regressions directory holds only the files failing runs write there)"
        )
    version = data.get("version")
    if isinstance(version, bool) or version not in REGRESSION_VERSIONS:
        raise ValueError(
            f"{name}: regression file version {version!r} is not one this lora-harness reads "
            f"({', '.join(map(str, REGRESSION_VERSIONS))})"
        )
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ValueError(f"{name}: field {missing[0]!r} is missing (a regression file has {', '.join(REQUIRED_FIELDS)})")
    for key in ("property", "layout"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"{name}: field {key!r} = {data[key]!r}: must be a non-empty string")
    for key in ("verdict", "error", "found", "found_with_impl"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{name}: field {key!r} = {data[key]!r}: must be a string")
    try:
        case = case_from_json(data["case"])
        case.validate()
    except ValueError as exc:  # CaseError is a ValueError
        raise ValueError(f"{name}: {exc}") from None
    if case.layout.describe() != data["layout"]:
        raise ValueError(
            f"{name}: field 'layout' = {data['layout']!r} differs from the case's layout {case.layout.describe()!r} "
            "(the file would never be replayed)"
        )
    return case


def read_regression_file(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(data, case) of one regression file, or ``ValueError`` naming the file and what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"regression file {p}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ValueError(
            f"regression file {p}: not valid JSON ({msg}{where}); a truncated or hand-edited file: fix or delete it"
        ) from None
    case = check_regression(data, f"regression file {p}")
    return data, case


class RegressionStore:
    """A directory of regression files; ``writable=False``: replayed, never written."""

    def __init__(self, directory: str | os.PathLike, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.writable = bool(writable)

    @property
    def read_only(self) -> bool:
        return not self.writable

    def __repr__(self) -> str:
        return f"RegressionStore({str(self.directory)!r}{'' if self.writable else ', writable=False'})"

    def check_writable(self) -> None:
        """Raise ``ValueError`` naming the directory if failures could not be stored there
        (nothing to check, and nothing created, for a read-only store)."""
        if not self.writable:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"regressions directory {str(self.directory)!r} is a file, not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"regressions directory {str(self.directory)!r} cannot be created: {exc.strerror or exc}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"regressions directory {str(self.directory)!r} is not writable")

    def validate(self) -> int:
        """Read every ``*.json`` file; ``ValueError`` naming the first bad one and what is wrong.

        Returns the number of regression files. A directory that does not
        exist holds none; a path that is a file is an error.
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"regressions directory {str(self.directory)!r} is a file, not a directory")
        files = self._files()
        bad = []
        for path in files:
            try:
                read_regression_file(path)
            except ValueError as exc:
                bad.append(str(exc))
        if bad:
            more = f" (and {len(bad) - 1} more bad file{'s' if len(bad) > 2 else ''} there)" if len(bad) > 1 else ""
            raise ValueError(bad[0] + more)
        return len(files)

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("*.json"))

    def entries(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every regression file with its data; ``ValueError`` for a bad one (``validate`` finds them first)."""
        for path in self._files():
            data, _ = read_regression_file(path)
            yield path, data

    def cases(self, prop: str, layout: str) -> list[tuple[Path, Any]]:
        """Stored cases for one property at one layout, oldest file name first."""
        found = []
        for path in self._files():
            data, case = read_regression_file(path)
            if data["property"] == prop and data["layout"] == layout:
                found.append((path, case))
        return found

    def save(self, prop: str, case: Any, verdict: str, error: str) -> Optional[Path]:
        """Store a failing case (idempotent: the same case maps to the same file); None, writing
        nothing, for a read-only store."""
        if not self.writable:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        case_json = case.to_json()
        digest = hashlib.sha1(json.dumps([prop, case_json], sort_keys=True).encode()).hexdigest()[:12]
        layout = case_json["layout"]
        path = self.directory / f"{prop}--{layout}--{digest}.json"
        if not path.exists():
            data = {
                "schema": REGRESSION_SCHEMA,
                "version": REGRESSION_VERSIONS[-1],
                "property": prop,
                "layout": layout,
                "found_with_impl": case_json["impl"],
                "found": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "verdict": verdict,
                "error": error.splitlines()[0][:500] if error else "",
                "case": case_json,
            }
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)
        return path


def open_store(directory: Optional[str | os.PathLike], writable: bool = True) -> Optional[RegressionStore]:
    return None if directory is None else RegressionStore(directory, writable=writable)
