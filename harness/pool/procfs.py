"""The one job: read the process table from ``/proc`` (live processes, their parent and session).

The fork server asks which children a process still has; the tests ask
whether a process, or any process of a session, is still alive. Zombies
(``Z``) and dead entries (``X``) count as gone.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

__all__ = ["available", "stat_fields", "live_processes", "children_of", "session_members", "is_running"]


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
