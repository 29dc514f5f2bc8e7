"""Registries open to plugins: import a package's own modules (or sub-packages), then the entry points of a group.

The property registry (``harness.properties``) and the family registry
(``harness.families``) both find their built-ins by name in their package
and other packages' through an entry point group; this is that search, once.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, Sequence


def discover(package: str, path: Iterable[str], group: str, what: str, *, packages: bool = False, first: Sequence[str] = ()) -> None:
    """Import every public module (``packages``: every public sub-package) of ``package``, those
    named in ``first`` first and the others by name, then load every entry point of ``group``.
    A plugin that fails to load raises ``ImportError`` naming ``what`` and the group."""
    names = {i.name for i in pkgutil.iter_modules(path) if not i.name.startswith("_") and (i.ispkg or not packages)}
    for name in [n for n in first if n in names] + sorted(names - set(first)):
        importlib.import_module(f"{package}.{name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=group):
            ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must say so, not vanish
        raise ImportError(f"loading lora-harness {what} plugins ({group}) failed: {exc}") from exc
