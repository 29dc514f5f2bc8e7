"""Failing examples stored as plain JSON and replayed on every later run, independently of hypothesis's database.

A ``RegressionStore`` is a directory the user names (the project's own is
``tests/regressions/``). Each file holds one case that failed one property
at one layout; ``cases(prop, layout)`` yields them for replay before any new
example is drawn.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from harness.cases import case_from_json

__all__ = ["RegressionStore", "REGRESSION_SCHEMA"]

REGRESSION_SCHEMA = "lora-harness-regression"


class RegressionStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def check_writable(self) -> None:
        """Raise ``ValueError`` naming the directory if failures could not be stored there."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"regressions directory {str(self.directory)!r} cannot be created: {exc.strerror or exc}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"regressions directory {str(self.directory)!r} is not writable")

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("*.json"))

    def entries(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        for path in self._files():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"stored regression {path} is not valid JSON: {exc}") from None
            if data.get("schema") != REGRESSION_SCHEMA:
                continue
            yield path, data

    def cases(self, prop: str, layout: str) -> list[tuple[Path, Any]]:
        """Stored cases for one property at one layout, oldest file name first."""
        found = []
        for path, data in self.entries():
            if data.get("property") == prop and data.get("layout") == layout:
                found.append((path, case_from_json(data["case"])))
        return found

    def save(self, prop: str, case: Any, verdict: str, error: str) -> Path:
        """Store a failing case (idempotent: the same case maps to the same file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        case_json = case.to_json()
        digest = hashlib.sha1(json.dumps([prop, case_json], sort_keys=True).encode()).hexdigest()[:12]
        layout = case_json["layout"]
        path = self.directory / f"{prop}--{layout}--{digest}.json"
        if not path.exists():
            data = {
                "schema": REGRESSION_SCHEMA,
                "version": 1,
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


def open_store(directory: Optional[str | os.PathLike]) -> Optional[RegressionStore]:
    return None if directory is None else RegressionStore(directory)
