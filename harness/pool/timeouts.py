"""How long a task may take: the timeout policy of rank pools and of the torchrun executor.

This module's one job is to say how long the owner waits for its ranks.
Settings are arguments, never environment variables.

* An explicit ``run(..., timeout=T)`` always wins.
* Otherwise the ceiling is the pool's ``timeout`` constructor argument (also
  accepted by ``get_pool``), default ``DEFAULT_TIMEOUT_S`` (60 s). The
  first task of a ``(world_size, backend)`` in this process gets the ceiling.
* Afterwards the timeout adapts: ``min(ceiling, max(ADAPTIVE_FLOOR_S,
  ADAPTIVE_FACTOR * slowest successful task so far))`` for that
  ``(world_size, backend)``, remembered across pool replacements in this
  process (:func:`task_timeout`, :func:`record_success`). A task's duration
  is the time from sending it to the last rank's report (what the timeout
  bounds; unpickling results is excluded). A hang planted in a hypothesis
  test that replays and shrinks many examples then costs ~10 s per example
  instead of a minute.
* The process-group (gloo) timeout is the ceiling, so a collective inside a
  task never waits longer than a default task may run. A task given an
  explicit timeout above the ceiling can see its collectives fail with a
  gloo timeout error instead of hanging.
* Pool start (process-group init plus ``initializer``) is bounded by the
  ceiling.
* After the first rank error, the ranks still silent get ``ERROR_GRACE_S``
  (a pool's ``error_grace``) to report before they are declared blocked.

The torchrun executor applies the same formula (:func:`adaptive_timeout`)
to its ``--rank-timeout`` ceiling and its own slowest task.
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ADAPTIVE_FLOOR_S",
    "ADAPTIVE_FACTOR",
    "ERROR_GRACE_S",
    "default_timeout",
    "seconds",
    "ceiling_of",
    "adaptive_timeout",
    "task_timeout",
    "record_success",
    "adaptive_policy",
]

DEFAULT_TIMEOUT_S = 60.0
ADAPTIVE_FLOOR_S = 10.0
ADAPTIVE_FACTOR = 10.0
# After the first rank error, how long the others may take to report before
# they are declared blocked. Long enough for a peer that merely finishes its
# work; short because a peer stuck in a collective with the failed rank would
# otherwise sit there until the gloo timeout. Not waited at all once every
# rank has reported. The default of RankPool(error_grace=...).
ERROR_GRACE_S = 0.5

# Slowest successful task per (world_size, backend) in this process; survives
# pool replacement so a replacement pool does not fall back to the ceiling.
_slowest_ok_s: dict[tuple[int, str], float] = {}


def default_timeout() -> float:
    """The default timeout ceiling, ``DEFAULT_TIMEOUT_S``; a pool's ``timeout=`` overrides it."""
    return DEFAULT_TIMEOUT_S


def seconds(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (>= 0 with ``allow_zero``), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def ceiling_of(timeout) -> float:
    """A pool's ``timeout=`` argument as its ceiling: ``None`` is ``DEFAULT_TIMEOUT_S``."""
    return DEFAULT_TIMEOUT_S if timeout is None else seconds("timeout", timeout)


def adaptive_timeout(ceiling: float, slowest: Optional[float]) -> float:
    """The ceiling until a task succeeded, then ``min(ceiling, max(floor, factor * slowest))``."""
    if slowest is None:
        return ceiling
    return min(ceiling, max(ADAPTIVE_FLOOR_S, ADAPTIVE_FACTOR * slowest))


def task_timeout(world_size: int, backend: str, ceiling: float | None = None) -> float:
    """The timeout the next task of ``(world_size, backend)`` gets (module docstring).

    ``ceiling``: the pool's ``timeout``; ``None`` means ``DEFAULT_TIMEOUT_S``.
    """
    ceiling = DEFAULT_TIMEOUT_S if ceiling is None else seconds("timeout", ceiling)
    return adaptive_timeout(ceiling, _slowest_ok_s.get((world_size, backend)))


def record_success(world_size: int, backend: str, took_s: float) -> None:
    """Remember a successful task of ``(world_size, backend)`` that took ``took_s`` seconds."""
    key = (world_size, backend)
    _slowest_ok_s[key] = max(took_s, _slowest_ok_s.get(key, 0.0))


def adaptive_policy(world_size: int, backend: str, ceiling: float) -> str:
    """How a pool's task without ``timeout=`` got its timeout, for a hang report."""
    return (
        f"adaptive: min(ceiling {ceiling:g} s, max({ADAPTIVE_FLOOR_S:g} s, "
        f"{ADAPTIVE_FACTOR:g} x slowest successful task "
        f"{_slowest_ok_s.get((world_size, backend), 0.0):.3f} s)); "
        f"raise it with run(..., timeout=) or the pool's timeout="
    )
