"""What a rank process of a local pool runs: its start, its task loop, its watchdog.

This module's one job is the rank side of a pool. A rank (started by
``harness.pool.pool`` from the fork server with a :class:`RankSpec`)
points its output at its file in the pool's directory, joins the process
group through the owner's ``TCPStore``, runs the pool's ``initializer``,
and then answers every :class:`~harness.pool.messages.RunTask` with exactly
one :class:`~harness.pool.messages.TaskDone` or
:class:`~harness.pool.messages.TaskRaised` until it gets
:class:`~harness.pool.messages.Stop`. ``ctx`` (:class:`RankContext`) is
what tasks see.

Ctrl-C belongs to the owner: ranks ignore SIGINT. ``SIGUSR1`` makes
faulthandler write the rank's Python stacks to its stack file. Forkserver
children are children of the fork server, not of the owner, so every rank
runs a watchdog thread (pidfd of the owner) that removes the pool's
directory and exits the rank (``WATCHDOG_EXIT_CODE``) when the owner
disappears; ranks tolerate the directory being gone.

The owner's ``__main__`` is re-imported in each rank as ``__mp_main__``
(standard multiprocessing), so a script that owns a pool needs the
``if __name__ == "__main__":`` guard. Without it the re-import would start
pools inside the ranks; instead :func:`refuse_inside_rank` (called by
``RankPool`` and ``get_pool``) raises a ``RuntimeError`` naming the fix,
the rank exits with ``MAIN_GUARD_EXIT_CODE`` and the owner's pool start
fails at once with a ``RankCrash`` whose report starts with the same advice.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import importlib
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import time
from typing import Any

from harness.pool.faults import MAIN_GUARD_EXIT_CODE, MAIN_GUARD_MESSAGE, WATCHDOG_EXIT_CODE
from harness.pool import procfs
from harness.pool.messages import RemoteError, Stop, TaskDone, TaskRaised, dumps, resolve
from harness.errors import MainGuardError as _MainGuardError

__all__ = ["RankContext", "RankSpec", "rank_main", "refuse_inside_rank", "STORE_HOST", "RANK_NAME_PREFIX"]

STORE_HOST = "127.0.0.1"
RANK_NAME_PREFIX = "lora-harness-rank"

# True in a rank process once rank_main runs: pools cannot nest.
_IN_RANK = False


@dataclasses.dataclass
class RankContext:
    """What a task sees on its rank.

    ``state`` persists across tasks in this rank process (caches, built
    models); it is lost when the pool is replaced.
    """

    rank: int
    world_size: int
    backend: str
    state: dict = dataclasses.field(default_factory=dict)
    pid: int = 0
    device: Any = None  # torch.device the rank computes on
    store: Any = None  # the TCPStore client of this world
    tasks_run: int = 0  # tasks started in this process before the current one
    owner_pid: int = 0  # the process that owns this pool (what a task may name files it shares with it by)


@dataclasses.dataclass
class RankSpec:
    """Everything a rank process needs from its owner to start."""

    rank: int
    world_size: int
    backend: str
    store_port: int
    owner_pid: int
    sys_path: list
    environ: dict
    preload: tuple
    initializer: str | None
    pg_timeout_s: float
    stack_file: str
    output_file: str
    pool_dir: str
    socket_dir: str | None = None  # the owner's multiprocessing temp dir (forkserver.socket_dir)


# ------------------------------------------------------------ owner gone ----


#: The owner of this rank's pool: its pid and multiprocessing temp dir (set by ``rank_main``).
_owner: dict = {"pid": 0, "socket_dir": None}


def _owner_gone(pool_dir: str) -> None:
    """Leave this rank because its owner is gone (or dropped it): never returns.

    The owner cannot clean up after a SIGKILL, so the ranks remove the pool's
    directory; every rank tries, whichever is first wins, and a directory
    already gone is fine. An owner that is alive only drops its pipes after
    it has read the directory, and removes it itself anyway.
    """
    try:
        shutil.rmtree(pool_dir, ignore_errors=True)
        # The owner's fork-server socket directory, only once the owner is dead (an owner
        # that dropped this rank still forks from it); a killed owner cannot remove it.
        if _owner["socket_dir"] and not procfs.is_running(_owner["pid"]):
            shutil.rmtree(_owner["socket_dir"], ignore_errors=True)
    finally:
        os._exit(WATCHDOG_EXIT_CODE)


def _watch_owner(owner_pid: int, pool_dir: str) -> None:
    """Exit this rank (removing the pool's directory) when the owning process is gone.

    A pidfd becomes readable when the process exits, zombie or not, and is
    immune to pid reuse; polling ``kill(pid, 0)`` is the fallback.
    """
    try:
        fd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        _owner_gone(pool_dir)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
            _owner_gone(pool_dir)
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                _owner_gone(pool_dir)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="lora-harness-owner-watchdog", daemon=True).start()


# ---------------------------------------------------------------- output ----


def _redirect_output(path: str) -> None:
    """Point fds 1 and 2 of this process (and ``sys.stdout``/``sys.stderr``) at ``path``.

    ``dup2`` rather than swapping Python objects, so output of C code and of
    subprocesses lands there too. Appending, so the owner may empty the file
    between tasks. If the directory is already gone (the owner vanished while
    we started), output goes to ``/dev/null``: the watchdog ends us anyway.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Line-buffered, so what a killed rank printed up to its last newline is
    # in the file; flushed fully after every task.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def _flush_output(libc) -> None:
    """Flush Python's and C's stdio buffers into the rank's output file."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if libc is not None:
        try:
            libc.fflush(None)
        except Exception:
            pass


def _libc():
    try:
        import ctypes

        return ctypes.CDLL(None)
    except Exception:
        return None


# ------------------------------------------------------------- the loop ----


def _raised(exc: BaseException) -> bytes:
    """The pickled reply for ``exc``, being handled."""
    return pickle.dumps(TaskRaised(RemoteError.from_exception(exc)))


def rank_main(spec: RankSpec, conn) -> None:
    """Body of one rank process: init the world, then serve tasks until told to stop."""
    global _IN_RANK
    _IN_RANK = True
    _owner.update(pid=spec.owner_pid, socket_dir=spec.socket_dir)
    # Ctrl-C belongs to the owner, which kills the pool; a KeyboardInterrupt
    # inside a rank would only race it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_owner(spec.owner_pid, spec.pool_dir)
    _redirect_output(spec.output_file)
    libc = _libc()
    import torch  # preloaded by the fork server: free

    # Ranks share a few cores; intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    try:
        stack_file = open(spec.stack_file, "a")
    except OSError:  # the directory is gone: the owner vanished
        _owner_gone(spec.pool_dir)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    # The fork server was started with the owner's path and environment of
    # that moment; tasks must see the owner's as of this pool's start.
    sys.path[:] = spec.sys_path
    os.environ.update(spec.environ)

    try:
        for name in spec.preload:
            importlib.import_module(name)
        import torch.distributed as dist

        from harness.gloo import share_one_device

        share_one_device()  # before any group: one gloo loop thread per rank, not one per group
        timeout = datetime.timedelta(seconds=spec.pg_timeout_s)
        store = dist.TCPStore(STORE_HOST, spec.store_port, None, False, timeout)
        if spec.backend == "nccl":
            local = spec.rank % max(1, torch.cuda.device_count())
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        dist.init_process_group(
            spec.backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=timeout
        )
        ctx = RankContext(
            rank=spec.rank,
            world_size=spec.world_size,
            backend=spec.backend,
            pid=os.getpid(),
            device=device,
            store=store,
            owner_pid=spec.owner_pid,
        )
        if spec.initializer:
            resolve(spec.initializer)(ctx)
        reply = pickle.dumps(TaskDone(pickle.dumps(os.getpid()), task_id=0))
    except BaseException as exc:
        reply = _raised(exc)
        ctx = None
    _flush_output(libc)
    try:
        conn.send_bytes(reply)
    except OSError:
        _owner_gone(spec.pool_dir)
    if ctx is None:
        # Start failed; wait to be killed rather than exit, so the owner
        # reports the error instead of a crash.
        _serve_until_eof(conn, spec.pool_dir)

    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            _owner_gone(spec.pool_dir)  # owner closed the pipe: it is gone or dropped us
        msg = pickle.loads(data)  # from the owner's own pickler: a RunTask or a Stop
        if isinstance(msg, Stop):
            break
        try:
            fn, args, kwargs = pickle.loads(msg.payload)
            value = fn(ctx, *args, **kwargs)
            try:
                blob = dumps(value)
            except BaseException as exc:
                raise TypeError(
                    f"the result of the task on rank {ctx.rank} ({type(value).__name__}) cannot be pickled "
                    f"for the parent: {exc}"
                ) from exc
            reply = pickle.dumps(TaskDone(blob, task_id=msg.task_id))
        except BaseException as exc:  # SystemExit too: a task must not end the rank silently
            reply = _raised(exc)
        ctx.tasks_run += 1
        # Everything the task printed is in the file before the owner hears
        # that it ended, so the owner's read after the report is complete.
        _flush_output(libc)
        try:
            conn.send_bytes(reply)
        except OSError:
            _owner_gone(spec.pool_dir)

    try:
        import torch.distributed as dist

        dist.destroy_process_group()
    finally:
        stack_file.close()


def _serve_until_eof(conn, pool_dir: str) -> None:
    while True:
        try:
            conn.recv_bytes()
        except (EOFError, OSError):
            _owner_gone(pool_dir)


# ------------------------------------------------------- no nested pools ----


def refuse_inside_rank() -> None:
    """Raise if this process is a rank: pools are started by the owner only.

    Two cases. While a rank re-imports the owner's ``__main__`` (forkserver
    children run it as ``__mp_main__`` before ``rank_main``), multiprocessing
    marks the process ``_inheriting`` and has already given it our rank's
    name: that is a script missing its ``__main__`` guard. The error then
    also ends the rank with ``MAIN_GUARD_EXIT_CODE`` (multiprocessing would
    print a traceback and exit 1), so the owner's pool start names the cause.
    Later (a task or initializer starting a pool) ``_IN_RANK`` is set.
    """
    if _IN_RANK:
        raise RuntimeError(
            "lora-harness: a rank pool cannot be started inside a rank process (from a task or an "
            "initializer); start pools in the process that owns them"
        )
    proc = multiprocessing.current_process()
    if getattr(proc, "_inheriting", False) and str(proc.name).startswith(RANK_NAME_PREFIX):
        _exit_rank_on_uncaught(_MainGuardError)
        raise _MainGuardError(MAIN_GUARD_MESSAGE)


def _exit_rank_on_uncaught(exc_type: type) -> None:
    """Make an uncaught ``exc_type`` print one line and exit with ``MAIN_GUARD_EXIT_CODE``.

    The fork server's child reports an exception escaping the ``__main__``
    re-import through ``sys.excepthook`` and then exits 1; the hook turns
    that into our distinctive code (and one line instead of a traceback of
    multiprocessing internals on the owner's terminal, once per rank).
    """
    previous = sys.excepthook

    def hook(etype, value, tb):
        if isinstance(value, exc_type):
            try:
                sys.stderr.write(f"{value} [rank process {os.getpid()}]\n")
                sys.stderr.flush()
            finally:
                os._exit(MAIN_GUARD_EXIT_CODE)
        previous(etype, value, tb)

    sys.excepthook = hook
