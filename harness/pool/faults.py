"""Infrastructure faults of a rank world: the exceptions and the one report text they carry.

This module's one job is to turn what the owner saw (which ranks raised,
died or stayed silent, their stacks and output) into a
:class:`RankPoolFault` whose ``str()`` is the full, human-readable report.
Both the local pool (``harness.pool.pool``) and the torchrun executor
(``harness.launch``) build their faults with :func:`make_fault`.

* :class:`RankTaskError` - one or more ranks raised (or a result could not be
  pickled/unpickled). Ranks still silent after the first error get a grace
  period; ranks silent then are blocked (typically in a collective waiting
  for the failed peer) and their Python stacks are included.
* :class:`RankCrash` - a rank process exited (``os._exit``, a signal, ...).
* :class:`RankHang` - not every rank reported within the timeout. The report
  carries the Python stacks of the silent ranks (of *all* ranks in a local
  pool).

A crash wins over errors, errors over a hang. Every report ends with the
last ``OUTPUT_TAIL_LINES`` lines each rank printed during the task; the
exception's ``output`` has all of it.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

from harness.pool.messages import RemoteError
from harness.pool.timeouts import QUIET_CPU
from harness.errors import RankCrash, RankHang, RankPoolFault, RankTaskError

__all__ = [
    "RankPoolFault",
    "RankTaskError",
    "RankCrash",
    "RankHang",
    "MAIN_GUARD_MESSAGE",
    "OUTPUT_TAIL_LINES",
    "describe_exit",
    "fault_report",
    "make_fault",
]

# Lines of each rank's output a fault report shows (the exception has all).
OUTPUT_TAIL_LINES = 20
# Exit codes of a rank that the report explains.
WATCHDOG_EXIT_CODE = 86  # distinctive, so a report shows "owner vanished"
MAIN_GUARD_EXIT_CODE = 87  # a rank re-imported a __main__ that starts pools

MAIN_GUARD_MESSAGE = (
    "lora-harness: a rank pool was started while importing __main__ inside a rank process; "
    'put the code that starts the pools under `if __name__ == "__main__":`'
)


def describe_exit(code) -> str:
    """A rank's exit code for a report: the signal that killed it, or what our own codes mean."""
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    if code == WATCHDOG_EXIT_CODE:
        return f"{code} (its owner process vanished)"
    if code == MAIN_GUARD_EXIT_CODE:
        return (
            f"{code} (re-importing the owner's __main__ started a rank pool: "
            'missing `if __name__ == "__main__":` guard)'
        )
    return str(code)


def indent(text: str) -> str:
    """``text`` indented by four spaces, one line per line, ending with a newline."""
    return "".join("    " + line + "\n" for line in text.rstrip("\n").splitlines()) or "    <empty>\n"


def fault_report(
    label: str,
    *,
    world_size: int,
    limit: float,
    grace: float,
    errors: dict[int, RemoteError],
    stacks: dict[int, str],
    pending: list[int],
    output: dict[int, str],
    hang_note: str,
    dead: Optional[dict[int, int]] = None,
    pids: Optional[list] = None,
    trailer: Optional[str] = None,
    quiet: Optional[float] = None,
) -> str:
    """The report of a fault in ``label`` ("task ... on N ranks (gloo)").

    ``errors``: what ranks raised; ``dead``: ``{rank: exit code}`` of ranks
    that died; ``pending``: ranks that neither reported nor died;
    ``stacks``: Python stacks of the ranks dumped; ``output``: what each
    rank printed during the task. ``limit``: the timeout the task had;
    ``grace``: how long silent ranks were given after the first fault;
    ``hang_note``: the sentence after a hang's headline (how the timeout
    was chosen). ``quiet``: set when the hang was called before the timeout
    because every pending rank slept for that many seconds.
    ``pids``: each rank's pid, named beside its rank where
    known. ``trailer``: a last line (what became of the world).
    """
    dead = dead or {}

    def who(rank: int) -> str:
        return f"rank {rank}" if pids is None else f"rank {rank} (pid {pids[rank]})"

    lines = []
    if any(code == MAIN_GUARD_EXIT_CODE for code in dead.values()):
        lines.append(MAIN_GUARD_MESSAGE)
    if dead:
        head = ", ".join(f"{who(r)} exited with code {describe_exit(c)}" for r, c in sorted(dead.items()))
        lines.append(f"RankCrash in {label}: {head}.")
    elif errors:
        lines.append(
            f"RankTaskError in {label}: "
            + "; ".join(f"rank {r} raised {e.exc_type}: {e.message}" for r, e in sorted(errors.items()))
        )
    else:
        reported = [r for r in range(world_size) if r not in pending]
        if quiet is not None:
            lines.append(
                f"RankHang in {label}: rank(s) {pending} did not report and were asleep (main thread "
                f"sleeping, under {QUIET_CPU:.0%} of a core) for {quiet:.3g} s (reported: {reported or 'none'}). "
                f"Nothing in the task can wake them but a timer: a deadlock, such as a collective that not "
                f"every rank entered or an event no rank sets. Called before the {limit:.3g} s timeout; a "
                f"pool's quiet=None waits for the timeout instead."
            )
        else:
            lines.append(
                f"RankHang in {label}: rank(s) {pending} did not report within {limit:.3g} s"
                f" (reported: {reported or 'none'}). {hang_note}"
            )
    for rank, e in sorted(errors.items()):
        lines.append(f"--- {who(rank)} raised {e.exc_type}: {e.message}")
        lines.append(indent(e.traceback or "<no traceback>"))
    for rank in sorted(stacks):
        why = "pending, no report" if rank in pending else "had reported"
        if (errors or dead) and rank in pending:
            why = f"no report within {grace:g} s after the first fault: blocked"
        where = f"pid {pids[rank]}, {why}" if pids is not None else why
        lines.append(f"--- Python stacks of rank {rank} ({where}):")
        lines.append(indent(stacks[rank]))
    for rank, text in sorted(output.items()):
        if not text:
            continue
        printed = text.rstrip("\n").splitlines()
        tail = printed[-OUTPUT_TAIL_LINES:]
        which = f"last {len(tail)} of {len(printed)} lines" if len(tail) < len(printed) else f"{len(printed)} line(s)"
        lines.append(f"--- output of {who(rank)} during this task, {which} (all: .output[{rank}]):")
        lines.append(indent("\n".join(tail)))
    if trailer:
        lines.append(trailer)
    return "\n".join(lines)


def make_fault(label: str, **report: Any) -> RankPoolFault:
    """The fault to raise, its report from :func:`fault_report` (``report``: its keyword arguments).

    A :class:`RankCrash` if a rank died, else a :class:`RankTaskError` if
    one raised, else a :class:`RankHang`; ``output`` becomes its ``output``.
    """
    text = fault_report(label, **report)
    dead, errors, stacks, pending = report.get("dead"), report["errors"], report["stacks"], report["pending"]
    fault: RankPoolFault
    if dead:
        fault = RankCrash(text, dict(dead), errors, stacks)
    elif errors:
        fault = RankTaskError(text, errors, stacks, list(pending))
    else:
        fault = RankHang(text, stacks, list(pending), report["limit"])
    fault.output = report["output"]
    return fault
