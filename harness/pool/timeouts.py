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
* A task need not wait for its timeout to be called a hang: when every rank
  that has not reported has been asleep for ``QUIET_S`` (a pool's
  ``quiet``; ``None`` turns it off), nothing in the task can wake them but
  a timer, and the task is a ``RankHang`` at once (a deadlock: one rank
  waits in a collective, or on an event, that no rank will complete).
  "Asleep" is read from ``/proc`` (``harness.pool.procfs.activity``): the
  main thread, which runs the task, sleeping at every look (once a
  second), and the whole process using at most ``QUIET_CPU`` of a core
  over the window (gloo's helper threads wake by themselves and take 2-3 %).
  A rank that computes, or a rank starved of CPU by a loaded machine, is
  running or runnable, so it is never taken for a blocked one; nor is one
  waiting for it. Without ``/proc`` only the timeout applies.

The torchrun executor applies the same formula (:func:`adaptive_timeout`)
to its ``--rank-timeout`` ceiling and its own slowest task.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from harness.pool import procfs

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ADAPTIVE_FLOOR_S",
    "ADAPTIVE_FACTOR",
    "ERROR_GRACE_S",
    "QUIET_S",
    "QUIET_SAMPLE_S",
    "QUIET_CPU",
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
# How long every silent rank must have been asleep, using no CPU, before a
# task is a hang without waiting for its timeout; the default of
# RankPool(quiet=...). Ten seconds: far longer than any wait of a working
# task on its peers (a peer that computes is awake), short next to the
# first task's 60 s ceiling.
QUIET_S = 10.0
# How often the silent ranks are looked at, and the share of a core an
# asleep rank may still use over the window: its helper threads (gloo's
# loops, one set per process group) wake by themselves, 2-3 % in all here.
QUIET_SAMPLE_S = 1.0
QUIET_CPU = 0.10

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


def quiet_setting(quiet) -> Optional[float]:
    """A pool's ``quiet=`` argument: ``None`` (off) or a positive number of seconds."""
    return None if quiet is None else seconds("quiet", quiet)


class QuietWatch:
    """Whether every silent rank has been asleep for ``quiet`` seconds (module docstring).

    ``sample(pids, now)`` is called as often as the owner likes; it reads
    ``/proc`` at most every ``QUIET_SAMPLE_S`` and returns True once the
    processes ``pids`` (the ranks that have not reported) had their main
    thread asleep at every look for at least ``quiet`` seconds, over at
    least three looks (a machine suspended between two looks is not a quiet
    task), each using at most ``QUIET_CPU`` of a core since the first of
    them. A change in ``pids`` starts over. ``quiet=None`` never returns True.
    """

    def __init__(self, quiet: Optional[float]):
        self.quiet = quiet
        self._pids: tuple = ()
        self._last_look: Optional[float] = None
        self._since: Optional[tuple[float, dict]] = None  # (first asleep look, {pid: ticks then})
        self._looks = 0

    def next_look(self, now: float) -> Optional[float]:
        """When the next look is due (None: never), so the owner's wait can wake for it."""
        if self.quiet is None:
            return None
        return now if self._last_look is None else self._last_look + QUIET_SAMPLE_S

    def sample(self, pids, now: float) -> bool:
        if self.quiet is None or not pids:
            return False
        pids = tuple(sorted(pids))
        if pids != self._pids:
            self._pids, self._last_look, self._since, self._looks = pids, None, None, 0
        if self._last_look is not None and now - self._last_look < QUIET_SAMPLE_S:
            return False
        self._last_look = now
        ticks: dict = {}
        for pid in pids:
            seen = procfs.activity(pid)
            if seen is None or seen[1]:  # gone or unknown (the sentinels and the timeout decide), or awake
                self._since, self._looks = None, 0
                return False
            ticks[pid] = seen[0]
        if self._since is not None:
            start, before = self._since
            budget = QUIET_CPU * (now - start) * _TICKS_PER_S + 2
            if any(ticks[p] - before[p] > budget for p in pids):
                self._since, self._looks = None, 0
        if self._since is None:
            self._since = (now, ticks)
        self._looks += 1
        return self._looks >= 3 and now - self._since[0] >= self.quiet


def _clock_ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


_TICKS_PER_S = _clock_ticks_per_s()
