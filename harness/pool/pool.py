"""RankPool: a persistent world of rank processes that runs one task at a time on every rank.

This module's one job is the owner's side of one pool: start ``world_size``
rank processes (``harness.pool.rank``) that hold an initialised
``torch.distributed`` process group, run a picklable task on every rank,
and return either every rank's result or one fault. It knows nothing about
LoRA, megatron or layouts; those arrive through ``initializer`` and the
tasks.

Contract of one task
--------------------
``RankPool.run(fn, *args, **kwargs)`` calls ``fn(ctx, *args, **kwargs)`` on
every rank, where ``ctx`` is that rank's ``RankContext``. Every rank always
ends the task by reporting exactly one message to the parent
(``harness.pool.messages``): its pickled result, or the type, message and
traceback of what it raised. The parent waits for all of them and returns
the results in rank order. Whatever else happens is an infrastructure
fault, raised as a ``RankPoolFault`` whose ``str()`` is the full report
(``harness.pool.faults``):

* ``RankTaskError`` - one or more ranks raised (or a result could not be
  pickled/unpickled). Once every rank has reported the fault is raised at
  once; ranks still silent after the first error get the pool's
  ``error_grace`` (default ``ERROR_GRACE_S`` = 0.5 s, bounded by the remaining
  timeout) to report; ranks still silent then are blocked (typically in a
  collective waiting for the failed peer) and their Python stacks are
  included.
* ``RankCrash`` - a rank process exited (``os._exit``, a signal, ...).
  Detected at once through the process sentinels, not by timing out.
* ``RankHang`` - not every rank reported within the timeout
  (``harness.pool.timeouts``), or every silent rank slept for ``quiet``
  seconds (a deadlock). The report carries the Python stacks of *all*
  ranks, dumped by ``faulthandler`` on ``SIGUSR1``.

Any fault retires the pool: every rank process is killed and reaped, so a
failed task never leaves a half-broken process group behind and never turns
into a hang of the parent. ``get_pool`` then transparently starts a fresh
pool. A ``KeyboardInterrupt`` (or ``SystemExit``) in the parent at any moment
of ``run`` retires the pool the same way and propagates unchanged.

What ranks print is captured per rank (``harness.pool.output``). The
rendezvous store is a ``TCPStore`` hosted by the parent on an OS-chosen
port, so any number of pytest-xdist workers on one machine never collide.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Callable

from harness.pool import lifecycle
from harness.pool.faults import RankPoolFault, make_fault
from harness.pool.forkserver import forkserver_lock, prepare_forkserver, short_socket_dir, socket_dir
from harness.pool.messages import Reply, RemoteError, RunTask, Stop, TaskRaised, task_name
from harness.pool.output import RankFiles
from harness.pool.rank import RANK_NAME_PREFIX, STORE_HOST, RankSpec, rank_main, refuse_inside_rank
from harness.pool.timeouts import (ERROR_GRACE_S, QUIET_S, QuietWatch, adaptive_policy, ceiling_of, quiet_setting,
                                   record_success, seconds, task_timeout)

__all__ = ["RankPool", "process_memory", "SHUTDOWN_JOIN_S"]

# How long a graceful shutdown waits for ranks to leave before SIGKILL.
SHUTDOWN_JOIN_S = 2.0


@dataclasses.dataclass
class _Outcome:
    reports: dict[int, Reply]  # rank -> its reply
    dead: dict  # rank -> exitcode
    pending: list  # ranks neither reported nor dead
    elapsed: float
    quiet: bool = False  # ended because every pending rank was asleep for the pool's ``quiet`` seconds


class RankPool:
    """A persistent world of ``world_size`` rank processes on ``backend``.

    See the module docstring for the task contract, ``harness.pool.output``
    for the output capture and ``harness.pool.timeouts`` for the timeout
    policy. ``timeout`` is the ceiling (default ``DEFAULT_TIMEOUT_S``) and
    the process-group timeout. ``error_grace`` is how long, after a rank's
    error, the ranks that have not reported yet may take before they are
    declared blocked (default ``ERROR_GRACE_S``; not waited when every rank
    has reported). ``quiet`` is how long every rank that has not reported
    may sleep without using CPU before the task is a hang without waiting
    for its timeout (default ``QUIET_S``; ``None``: only the timeout).
    ``initializer`` is ``"module:function"``, called as
    ``function(ctx)`` on every rank once the process group exists. A task
    cannot take a keyword argument named ``timeout``: ``run`` consumes it.

    ``last_output``: ``{rank: text}`` printed by each rank during the last
    task (or the start), the last ``OUTPUT_KEEP_BYTES`` of it.
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        *,
        initializer: str | None = None,
        preload=("torch",),
        timeout: float | None = None,
        error_grace: float = ERROR_GRACE_S,
        quiet: float | None = QUIET_S,
    ):
        refuse_inside_rank()
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        self._ceiling = ceiling_of(timeout)
        self.error_grace = seconds("error_grace", error_grace, allow_zero=True)
        self.quiet = quiet_setting(quiet)
        self.world_size = world_size
        self.backend = backend
        self.initializer = initializer
        self.preload = tuple(preload)
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._retired = False
        self._procs: list = []
        self._conns: list = []
        self._store = None
        self._files: RankFiles | None = None  # the pool's directory: output and stack files
        self._dir: str | None = None
        self.last_output: dict[int, str] = {}
        self._task_id = 0
        self.tasks_run = 0
        self.retire_reason: str | None = None
        lifecycle.track(self)
        started = time.monotonic()
        try:
            self._start()
        except BaseException:
            if not self._retired:
                self._retire("start failed")
            raise
        self.start_seconds = time.monotonic() - started

    # -- introspection ------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def alive(self) -> bool:
        return (
            not self._retired
            and os.getpid() == self.owner_pid
            and all(p.is_alive() for p in self._procs)
        )

    @property
    def timeout(self) -> float:
        """The ceiling: the ``timeout`` this pool was started with, else ``DEFAULT_TIMEOUT_S``."""
        return self._ceiling

    @property
    def next_timeout(self) -> float:
        """The timeout a ``run`` without ``timeout=`` gets now."""
        return task_timeout(self.world_size, self.backend, self._ceiling)

    def _config(self) -> tuple:
        return (self.initializer, self.preload, self._ceiling)

    def memory(self) -> list[dict]:
        """Each rank's memory now, in rank order, read from ``/proc`` by the owner (no task runs).

        Per rank a dict of MiB (:func:`process_memory`): ``rss`` (resident,
        counting pages shared with the fork server and the other ranks),
        ``hwm`` (peak resident), ``pss`` (shared pages divided among their
        sharers: what the rank really adds), ``uss`` (private pages only).
        Works while a task runs; a rank that has exited reads as ``{}``.
        """
        return [process_memory(pid) if pid else {} for pid in self.pids]

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"retired ({self.retire_reason})"
        return f"RankPool(world_size={self.world_size}, backend={self.backend!r}, pids={self.pids}, {state})"

    # -- start --------------------------------------------------------------

    def _start(self) -> None:
        import torch.distributed as dist

        ceiling = self._ceiling
        ctx = multiprocessing.get_context("forkserver")
        self._files = RankFiles(self.world_size, self.owner_pid, self)
        self._dir = self._files.dir
        self._store = dist.TCPStore(
            STORE_HOST, 0, None, True, datetime.timedelta(seconds=ceiling), wait_for_workers=False
        )
        # Held while forking so no other thread restarts the fork server
        # between our check for its children and our own forks.
        with forkserver_lock:
            short_socket_dir()
            prepare_forkserver(self.preload)
            self._spawn_ranks(ctx, ceiling)
        label = f"start of a {self.world_size}-rank {self.backend} pool (initializer={self.initializer!r})"
        outcome = self._collect(list(range(self.world_size)), time.monotonic() + ceiling)
        self._raise_if_fault(outcome, label, ceiling, "the ceiling bounds a pool start")

    def _spawn_ranks(self, ctx, ceiling: float) -> None:
        for rank in range(self.world_size):
            spec = RankSpec(
                rank=rank,
                world_size=self.world_size,
                backend=self.backend,
                store_port=self._store.port,
                owner_pid=self.owner_pid,
                sys_path=list(sys.path),
                environ=dict(os.environ),
                preload=self.preload,
                initializer=self.initializer,
                pg_timeout_s=ceiling,
                stack_file=self._files.stack_path(rank),
                output_file=self._files.output_path(rank),
                pool_dir=self._dir,
                socket_dir=socket_dir(),
            )
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=rank_main,
                args=(spec, child_end),
                # The prefix also tells refuse_inside_rank that a process
                # re-importing __main__ is one of our ranks.
                name=f"{RANK_NAME_PREFIX}{rank}of{self.world_size}-{self.backend}",
                # daemonic: multiprocessing's own exit hook terminates them
                # too, instead of joining them forever.
                daemon=True,
            )
            self._procs.append(proc)
            self._conns.append(parent_end)
            proc.start()
            child_end.close()

    # -- run ----------------------------------------------------------------

    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list:
        """Call ``fn(ctx, *args, **kwargs)`` on every rank; return the results in rank order.

        What each rank printed meanwhile is in ``last_output`` afterwards.
        Raises :class:`RankTaskError`, :class:`RankCrash` or :class:`RankHang`
        (and retires the pool) on any fault; ``TypeError`` without touching
        the pool if ``fn``/arguments cannot be pickled; ``ValueError`` for a
        ``timeout`` that is not a positive number of seconds. A
        ``KeyboardInterrupt`` meanwhile retires the pool and propagates.
        """
        with self._lock:
            if self._retired or os.getpid() != self.owner_pid:
                raise RankPoolFault(
                    f"{self!r} is retired ({self.retire_reason}); get a fresh pool with get_pool()"
                )
            if timeout is not None:
                limit, policy = seconds("timeout", timeout), "explicit timeout= argument"
            else:
                limit = self.next_timeout
                policy = adaptive_policy(self.world_size, self.backend, self._ceiling)
            name = task_name(fn)
            try:
                payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise TypeError(
                    f"task {name} or its arguments cannot be pickled for the rank processes "
                    f"(tasks must be top-level functions of an importable module): {exc}"
                ) from exc
            self._task_id += 1
            message = pickle.dumps(RunTask(self._task_id, payload), protocol=pickle.HIGHEST_PROTOCOL)
            label = f"task {name} on {self.world_size} ranks ({self.backend})"
            self.last_output = {}
            try:
                started = time.monotonic()
                deadline = started + limit
                sent = self._send_all(message)
                outcome = self._collect(sent, deadline)
                waited = time.monotonic() - started
                results = self._raise_if_fault(outcome, label, limit, policy)
            except BaseException as exc:
                # Faults have retired already; this is Ctrl-C, SystemExit or
                # a bug of ours: never leave ranks running a task behind.
                if not self._retired:
                    self._retire(f"{type(exc).__name__} in {label}")
                raise
            # The timeout bounds the wait for the ranks' reports, so adapt on
            # that; unpickling results in the parent is excluded (the first
            # tensor pickled by a rank that imported megatron.core makes the
            # parent import megatron.core, seconds once).
            record_success(self.world_size, self.backend, waited)
            self.tasks_run += 1
            return results

    def _send_all(self, message: bytes) -> list[int]:
        """Send to every rank; stop at the first that cannot take it (it died).

        Ranks after it are not sent the task, so they are not waited for: they
        sit idle, not blocked, and the dead rank's sentinel reports the crash.
        """
        sent = []
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(message)
            except OSError:
                sent.append(rank)  # its sentinel tells how it died
                break
            sent.append(rank)
        return sent

    def _collect(self, ranks: list[int], deadline: float) -> _Outcome:
        """Wait for one message from each of ``ranks``, or their death, or the deadline.

        Returns as soon as every rank has reported or died. After the first
        error or death, the rest get ``error_grace`` more seconds.
        """
        started = time.monotonic()
        pending = set(ranks)
        reports: dict[int, Reply] = {}
        dead: dict = {}
        by_conn = {self._conns[r]: r for r in ranks}
        by_sentinel = {self._procs[r].sentinel: r for r in ranks}
        closed: set[int] = set()  # ranks whose pipe hit EOF: wait for the sentinel
        fault_at: float | None = None
        grace = self.error_grace
        watch = QuietWatch(self.quiet)
        quiet = False

        def take(rank: int, data: bytes) -> None:
            nonlocal fault_at
            try:
                msg = pickle.loads(data)
            except Exception as exc:  # only our own messages travel here
                msg = TaskRaised(RemoteError(type(exc).__name__, f"undecodable message from rank {rank}: {exc}", ""))
            reports[rank] = msg
            pending.discard(rank)
            if not msg.ok and fault_at is None:
                fault_at = time.monotonic()

        while pending:
            now = time.monotonic()
            limit = deadline if fault_at is None else min(deadline, fault_at + grace)
            if now >= limit:
                break
            if fault_at is None and watch.sample([self._procs[r].pid for r in pending], now):
                quiet = True
                break
            wake = limit if fault_at is not None else min(limit, watch.next_look(now) or limit)
            waitables = [self._conns[r] for r in pending if r not in closed]
            waitables += [self._procs[r].sentinel for r in pending]
            for obj in multiprocessing.connection.wait(waitables, timeout=max(0.0, wake - now)):
                if obj in by_conn:
                    rank = by_conn[obj]
                    if rank not in pending:
                        continue
                    try:
                        take(rank, obj.recv_bytes())
                    except (EOFError, OSError):
                        closed.add(rank)
                else:
                    rank = by_sentinel[obj]
                    if rank not in pending:
                        continue
                    conn = self._conns[rank]
                    # It may have reported just before it exited.
                    try:
                        if rank not in closed and conn.poll():
                            take(rank, conn.recv_bytes())
                            continue
                    except (EOFError, OSError):
                        pass
                    self._procs[rank].join(1.0)
                    dead[rank] = self._procs[rank].exitcode
                    pending.discard(rank)
                    if fault_at is None:
                        fault_at = time.monotonic()
        return _Outcome(reports, dead, sorted(pending), time.monotonic() - started, quiet)

    def _raise_if_fault(self, outcome: _Outcome, label: str, limit: float, policy: str) -> list:
        errors: dict[int, RemoteError] = {}
        results: list = [None] * self.world_size
        for rank, msg in sorted(outcome.reports.items()):
            if msg.ok:
                try:
                    results[rank] = pickle.loads(msg.value)
                except Exception as exc:  # not BaseException: Ctrl-C here is the user's, not the rank's
                    errors[rank] = RemoteError(
                        type(exc).__name__,
                        f"the result of rank {rank} could not be unpickled in the parent: {exc}",
                        traceback.format_exc(),
                    )
            else:
                errors[rank] = msg.error
        if not errors and not outcome.dead and not outcome.pending:
            self.last_output = self._files.read_output(may_reset=True)
            return results

        pids = self.pids
        if outcome.pending and not outcome.dead and not errors:
            stacks = self._files.dump_stacks(self._procs, list(range(self.world_size)))
        else:
            stacks = self._files.dump_stacks(self._procs, outcome.pending) if outcome.pending else {}
        output = self._files.read_output()
        self.last_output = output
        self._retire(f"fault in {label}")
        raise make_fault(
            label,
            world_size=self.world_size,
            limit=limit,
            grace=self.error_grace,
            errors=errors,
            stacks=stacks,
            pending=outcome.pending,
            output=output,
            hang_note=f"Timeout policy: {policy}.",
            quiet=self.quiet if outcome.quiet else None,
            dead=outcome.dead,
            pids=pids,
            trailer=(
                f"The pool was retired (all {self.world_size} rank processes killed); "
                f"the next get_pool({self.world_size}, {self.backend!r}) starts a fresh one."
            ),
        )

    # -- shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the ranks: ask politely, join briefly, then SIGKILL. Idempotent."""
        with self._lock:
            if not self._retired:
                self._retire("shut down", graceful=True)

    def _retire(self, reason: str, graceful: bool = False) -> None:
        self._retired = True
        self.retire_reason = reason
        lifecycle.untrack(self)
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the owner: these ranks are not ours to kill
        started = [proc for proc in self._procs if proc.pid is not None]
        try:
            if graceful:
                stop = pickle.dumps(Stop())
                for conn in self._conns:
                    try:
                        conn.send_bytes(stop)
                    except OSError:
                        pass
                deadline = time.monotonic() + SHUTDOWN_JOIN_S
                for proc in started:
                    proc.join(max(0.0, deadline - time.monotonic()))
        finally:
            # Even if a Ctrl-C cut the polite part short: kill first, all at
            # once, so no rank outlives this call by more than the join.
            for proc in started:
                if proc.exitcode is None:
                    try:
                        proc.kill()
                    except (ProcessLookupError, OSError):
                        pass
            try:
                for proc in started:
                    # The fork server reaps them and reports through the
                    # sentinel, so after join the pid is gone from the
                    # process table.
                    proc.join(5.0)
            finally:
                for conn in self._conns:
                    conn.close()
                self._store = None
                if self._files is not None:
                    self._files.release()


def process_memory(pid: int) -> dict:
    """Memory of process ``pid`` in MiB from ``/proc``: rss, hwm (peak rss), pss, uss; ``{}`` if unreadable.

    Also ``threads``, its number of threads (a count, not MiB).
    """
    out: dict = {}
    fields = {"VmRSS:": "rss", "VmHWM:": "hwm", "Pss:": "pss", "Private_Clean:": "uss", "Private_Dirty:": "uss",
              "Threads:": "threads"}
    for name in ("status", "smaps_rollup"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    parts = line.split()
                    key = fields.get(parts[0]) if parts else None
                    if key == "threads" and len(parts) >= 2:
                        out[key] = int(parts[1])
                    elif key is not None and len(parts) >= 2:
                        out[key] = out.get(key, 0.0) + int(parts[1]) / 1024.0  # kB -> MiB
        except (OSError, ValueError):
            continue
    return out
