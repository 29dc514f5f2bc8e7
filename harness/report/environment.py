"""What a run ran on, for ``results.json`` and the report's environment table.

Only versions and machine facts that explain a numeric result: no host
name, user name, paths or environment variables. Versions come from
``importlib.metadata`` so that collecting them never imports megatron-core
(or torch, or the implementation) when the run has not already done so.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
from typing import Any, Optional

__all__ = ["collect_environment"]

_GIT_TIMEOUT_S = 2.0


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken installation's metadata must not break a report
        return None


def _impl_version(impl: str) -> tuple[Optional[str], Optional[str]]:
    """(version, distribution) of the implementation module, without importing it.

    ``__version__`` of the module (or of a parent package) when it is already
    imported; otherwise the installed distribution that provides its
    top-level package, when one is known.
    """
    parts = impl.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        version = getattr(module, "__version__", None) if module is not None else None
        if isinstance(version, str) and version:
            return version, None
    try:
        dists = metadata.packages_distributions().get(parts[0]) or []
    except Exception:
        dists = []
    for dist in dict.fromkeys(dists):  # unique, in order
        version = _dist_version(dist)
        if version is not None:
            return version, dist
    return None, None


def _git(*args: str) -> Optional[str]:
    try:
        proc = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            # Never take the index lock: someone may be committing right now.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _git_state() -> tuple[Optional[str], Optional[bool]]:
    head = _git("rev-parse", "HEAD")
    if head is None or not head.strip():
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), (None if status is None else bool(status.strip()))


def collect_environment(impl: str) -> dict[str, Any]:
    """Versions and machine facts for a run of implementation module ``impl``.

    Keys: ``impl``, ``impl_version`` (None when unknown), ``impl_distribution``
    (the distribution the version came from, None when it came from
    ``__version__`` or is unknown), ``python``, ``torch``, ``megatron-core``,
    ``hypothesis``, ``lora-harness`` (None when not installed), ``git_commit``
    and ``git_dirty`` of the current directory (None outside a work tree),
    ``platform``, ``machine``, ``cpu_count``; and ``torch_cuda`` (the CUDA
    torch was built with) when torch is already imported.
    """
    impl_version, impl_dist = _impl_version(impl)
    commit, dirty = _git_state()
    env: dict[str, Any] = {
        "impl": impl,
        "impl_version": impl_version,
        "impl_distribution": impl_dist,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": _dist_version("torch"),
        "megatron-core": _dist_version("megatron-core"),
        "hypothesis": _dist_version("hypothesis"),
        "lora-harness": _dist_version("lora-harness"),
        "git_commit": commit,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    return env
