"""The one job: read the process table from ``/proc`` (live processes, their parent and session, their activity).

The fork server asks which children a process still has; the tests ask
whether a process, or any process of a session, is still alive; a pool
asks whether its silent ranks are doing anything at all (:func:`activity`).
Zombies (``Z``) and dead entries (``X``) count as gone.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

__all__ = ["available", "stat_fields", "live_processes", "children_of", "session_members", "is_running", "activity"]


def available() -> bool:
    return os.path.isdir("/proc")


def stat_fields(pid: int) -> Optional[list[str]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, session, ...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """``(pid, stat fields)`` of every live process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X"):
                yield int(entry), fields


def children_of(pid: int) -> list[int]:
    """Live children of ``pid``."""
    return [p for p, fields in live_processes() if int(fields[1]) == pid]


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a session outlives reparenting: everything a session leader started)."""
    return [p for p, fields in live_processes() if int(fields[3]) == sid]


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def activity(pid: int) -> Optional[tuple[int, bool]]:
    """``(CPU clock ticks used so far, whether its main thread is awake)`` of ``pid``; None if unknown.

    The ticks are user plus system time of all its threads (``/proc/<pid>/stat``
    fields 14 and 15). The main thread is awake unless it sleeps
    interruptibly (``S``) or is idle (``I``): running or runnable (``R``), in
    an uninterruptible wait such as disk I/O (``D``), stopped or traced
    (``T``, ``t``) all count as awake, so a process starved of CPU, paging or
    held in a debugger is never taken for a blocked one. Helper threads
    (gloo's loops, say) wake now and then by themselves, so only their CPU
    time is counted, not their state.
    """
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[11]) + int(fields[12]), fields[0] not in ("S", "I")
    except (ValueError, IndexError):
        return None
