"""Rank pool: run one task on every rank of a persistent multi-process world.

This module's one job is to keep, per ``(world_size, backend)``, a pool of
rank processes that already hold an initialised ``torch.distributed`` process
group, run a picklable task on every rank, and return either every rank's
result or one human-readable fault report. It knows nothing about LoRA,
megatron or layouts; those arrive through ``initializer`` and the tasks.

Contract of one task
--------------------
``RankPool.run(fn, *args, **kwargs)`` calls ``fn(ctx, *args, **kwargs)`` on
every rank, where ``ctx`` is that rank's :class:`RankContext`. Every rank
always ends the task by reporting exactly one message to the parent: its
pickled result, or the type, message and traceback of what it raised. The
parent waits for all of them and returns the results in rank order. Whatever
else happens is an infrastructure fault, raised as a :class:`RankPoolFault`
whose ``str()`` is the full report:

* :class:`RankTaskError` - one or more ranks raised (or a result could not be
  pickled/unpickled). Once every rank has reported the fault is raised at
  once; ranks still silent after the first error get the pool's
  ``error_grace`` (default ``ERROR_GRACE_S`` = 0.5 s, bounded by the remaining
  timeout) to report; ranks still silent then are blocked (typically in a
  collective waiting for the failed peer) and their Python stacks are
  included.
* :class:`RankCrash` - a rank process exited (``os._exit``, a signal, ...).
  Detected at once through the process sentinels, not by timing out.
* :class:`RankHang` - not every rank reported within the timeout. The report
  carries the Python stacks of *all* ranks, dumped by ``faulthandler`` on
  ``SIGUSR1``.

Any fault retires the pool: every rank process is killed and reaped, so a
failed task never leaves a half-broken process group behind and never turns
into a hang of the parent. :func:`get_pool` then transparently starts a fresh
pool. A ``KeyboardInterrupt`` (or ``SystemExit``) in the parent at any moment
of ``run`` retires the pool the same way and propagates unchanged.

Rank output
-----------
Each rank points its file descriptors 1 and 2 (``os.dup2``, so C-level and
subprocess output is caught too) at one file per rank in the pool's temporary
directory; nothing a task prints reaches the parent's terminal. After every
task (and the pool start) the parent reads what each rank printed during it:
``pool.last_output`` is ``{rank: text}``, keeping the last
``OUTPUT_KEEP_BYTES`` (64 KiB) with a marker when more was printed. Fault
exceptions carry the same dict as ``output``, and their report ends with the
last ``OUTPUT_TAIL_LINES`` lines of each rank's output.

Timeout policy
--------------
Settings are arguments, never environment variables.

* An explicit ``run(..., timeout=T)`` always wins.
* Otherwise the ceiling is the pool's ``timeout`` constructor argument (also
  accepted by :func:`get_pool`), default ``DEFAULT_TIMEOUT_S`` (60 s). The
  first task of a ``(world_size, backend)`` in this process gets the ceiling.
* Afterwards the timeout adapts: ``min(ceiling, max(ADAPTIVE_FLOOR_S,
  ADAPTIVE_FACTOR * slowest successful task so far))`` for that
  ``(world_size, backend)``, remembered across pool replacements in this
  process. A task's duration is the time from sending it to the last rank's
  report (what the timeout bounds; unpickling results is excluded). A hang
  planted in a hypothesis test that replays and shrinks many examples then
  costs ~10 s per example instead of a minute.
* The process-group (gloo) timeout is the ceiling, so a collective inside a
  task never waits longer than a default task may run. A task given an
  explicit timeout above the ceiling can see its collectives fail with a
  gloo timeout error instead of hanging.
* Pool start (process-group init plus ``initializer``) is bounded by the
  ceiling.

Processes
---------
Ranks are started from multiprocessing's ``forkserver`` context with
``preload`` imported in the fork server, so a (re)start costs a fork plus a
process-group rendezvous instead of a fresh ``import torch`` per rank. The
fork server is process-global and imports its list once; a pool asking for
more is served by restarting it with the union when no rank is alive, else
its ranks import the rest themselves (correct, slower to start).

The owner's ``__main__`` is re-imported in each rank as ``__mp_main__``
(standard multiprocessing), so a script that owns a pool needs the
``if __name__ == "__main__":`` guard. Without it the re-import would start
pools inside the ranks; instead ``RankPool``/``get_pool`` refuse to run inside
a rank process with a ``RuntimeError`` naming the fix, the rank exits with
``_MAIN_GUARD_EXIT_CODE`` and the owner's pool start fails at once with a
:class:`RankCrash` whose report starts with the same advice.

The rendezvous store is a ``TCPStore`` hosted by the parent on an OS-chosen
port, so any number of pytest-xdist workers on one machine never collide.

Cleanup: nothing outlives the owner, and no ``lora-harness-ws*`` temporary
directory is left behind.

* Normal exit: ``shutdown_all`` (atexit) stops every pool of this process,
  ``get_pool``'s or constructed directly, and removes its directory.
* A fault or Ctrl-C: the pool is retired at once (ranks SIGKILLed, directory
  removed).
* SIGTERM of the owner: if SIGTERM still has its default action when the
  first pool starts (and we are in the main thread), a handler is installed
  that SIGKILLs every rank, removes the directories, restores the default
  action and re-sends SIGTERM to the owner, so the owner still dies *by
  SIGTERM* (its parent sees the usual status). Converting SIGTERM into
  ``SystemExit`` was rejected: it can be swallowed by ``except BaseException``,
  runs arbitrary ``finally`` blocks of the interrupted code (which may block),
  and changes the exit status. The handler takes no locks, so it is safe
  whatever the main thread was doing. A handler installed by someone else
  is left alone (their code decides how to exit; atexit then cleans up).
* SIGKILL of the owner: nothing runs in the owner. Forkserver children are
  children of the fork server, not of the owner, so every rank runs a
  watchdog thread (pidfd of the owner) that removes the pool's directory and
  exits the rank when the owner disappears; ranks tolerate the directory
  being gone. The fork server exits by itself when the owner dies (it
  watches a pipe whose only writer is the owner), and so does
  multiprocessing's resource tracker.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import faulthandler
import importlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # imported before our atexit hook so ours runs first (LIFO)
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable

__all__ = [
    "RankPoolFault",
    "RankTaskError",
    "RankCrash",
    "RankHang",
    "RankContext",
    "RankPool",
    "get_pool",
    "shutdown_all",
    "default_timeout",
    "task_timeout",
    "process_memory",
    "DEFAULT_TIMEOUT_S",
    "ERROR_GRACE_S",
    "MAIN_GUARD_MESSAGE",
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
# How long a graceful shutdown waits for ranks to leave before SIGKILL.
SHUTDOWN_JOIN_S = 2.0
# How long the parent waits for faulthandler to finish writing stacks.
STACK_DUMP_WAIT_S = 2.0

_STORE_HOST = "127.0.0.1"
_WATCHDOG_EXIT_CODE = 86  # distinctive, so a report shows "owner vanished"
_MAIN_GUARD_EXIT_CODE = 87  # a rank re-imported a __main__ that starts pools
_RANK_NAME_PREFIX = "lora-harness-rank"
_DIR_PREFIX = "lora-harness-ws"
# Rank output kept per task (the end of it) and lines of it in a fault report.
OUTPUT_KEEP_BYTES = 64 * 1024
OUTPUT_TAIL_LINES = 20
# A rank's output file is emptied (between tasks) once it grows past this.
_OUTPUT_FILE_RESET_BYTES = 8 * 1024 * 1024

MAIN_GUARD_MESSAGE = (
    "lora-harness: a rank pool was started while importing __main__ inside a rank process; "
    'put the code that starts the pools under `if __name__ == "__main__":`'
)

# True in a rank process once _rank_main runs: pools cannot nest.
_IN_RANK = False


# ---------------------------------------------------------------- faults ----


class RankPoolFault(Exception):
    """An infrastructure fault of a rank pool; ``str()`` is the full report.

    ``output``: ``{rank: text}`` the ranks printed during the failed task (or
    pool start), as ``RankPool.last_output``; empty where not applicable.
    """

    output: dict = {}


class RankTaskError(RankPoolFault):
    """One or more ranks raised.

    ``errors``: ``{rank: (exc_type_name, message, traceback_str)}``;
    ``stacks``: stacks of ranks that had not reported within the grace period;
    ``pending``: those ranks.
    """

    def __init__(self, report: str, errors: dict, stacks: dict | None = None, pending: list | None = None):
        super().__init__(report)
        self.errors = errors
        self.stacks = stacks or {}
        self.pending = pending or []


class RankCrash(RankPoolFault):
    """A rank process died. ``exitcodes``: ``{rank: code}`` (negative: signal).

    ``errors`` and ``stacks`` carry what the surviving ranks reported or were
    doing, as context.
    """

    def __init__(self, report: str, exitcodes: dict, errors: dict | None = None, stacks: dict | None = None):
        super().__init__(report)
        self.exitcodes = exitcodes
        self.errors = errors or {}
        self.stacks = stacks or {}


class RankHang(RankPoolFault):
    """Ranks did not report within the timeout.

    ``pending``: ranks that did not report; ``stacks``: ``{rank: str}`` for
    every rank, pending or not.
    """

    def __init__(self, report: str, stacks: dict, pending: list, timeout: float):
        super().__init__(report)
        self.stacks = stacks
        self.pending = pending
        self.timeout = timeout


# --------------------------------------------------------- timeout policy ---

# Slowest successful task per (world_size, backend) in this process; survives
# pool replacement so a replacement pool does not fall back to the ceiling.
_slowest_ok_s: dict[tuple[int, str], float] = {}


def default_timeout() -> float:
    """The default timeout ceiling, ``DEFAULT_TIMEOUT_S``; a pool's ``timeout=`` overrides it."""
    return DEFAULT_TIMEOUT_S


def _seconds(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (>= 0 with ``allow_zero``), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def task_timeout(world_size: int, backend: str, ceiling: float | None = None) -> float:
    """The timeout the next task of ``(world_size, backend)`` gets (module docstring).

    ``ceiling``: the pool's ``timeout``; ``None`` means ``DEFAULT_TIMEOUT_S``.
    """
    ceiling = DEFAULT_TIMEOUT_S if ceiling is None else _seconds("timeout", ceiling)
    slowest = _slowest_ok_s.get((world_size, backend))
    if slowest is None:
        return ceiling
    return min(ceiling, max(ADAPTIVE_FLOOR_S, ADAPTIVE_FACTOR * slowest))


def _record_success(world_size: int, backend: str, seconds: float) -> None:
    key = (world_size, backend)
    _slowest_ok_s[key] = max(seconds, _slowest_ok_s.get(key, 0.0))


# ------------------------------------------------------------ rank side ----


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


def _rebuild_tensor(data: bytes, dtype: Any, shape: tuple, requires_grad: bool, parameter: bool) -> Any:
    import torch

    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    t = flat.view(dtype).reshape(shape)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(True) if requires_grad else t


class _TensorPickler(pickle.Pickler):
    """Pickles CPU tensors as their raw bytes: torch's own reduction saves each
    storage with ``torch.save`` (a zip archive per tensor), about 0.1 ms a
    tensor each way, which for a rank task's records (hundreds of small
    tensors) was a tenth of a second per example. Anything unusual
    (sparse, quantized, other devices, subclasses) goes torch's way."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None or type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return NotImplemented
        if obj.device.type != "cpu" or obj.layout is not torch.strided or obj.is_quantized:
            return NotImplemented
        t = obj.detach().resolve_conj().resolve_neg().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return _rebuild_tensor, (data, t.dtype, tuple(t.shape), obj.requires_grad, type(obj) is torch.nn.Parameter)


def dumps(value: Any) -> bytes:
    """``pickle.dumps`` with CPU tensors as raw bytes (``_TensorPickler``); ``pickle.loads`` reads it."""
    import io

    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


@dataclasses.dataclass
class _RankSpec:
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


def _owner_gone(pool_dir: str) -> None:
    """Leave this rank because its owner is gone (or dropped it): never returns.

    The owner cannot clean up after a SIGKILL, so the ranks remove the pool's
    directory; every rank tries, whichever is first wins, and a directory
    already gone is fine. An owner that is alive only drops its pipes after
    it has read the directory, and removes it itself anyway.
    """
    try:
        shutil.rmtree(pool_dir, ignore_errors=True)
    finally:
        os._exit(_WATCHDOG_EXIT_CODE)


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


def _error_message(kind: str, exc: BaseException) -> bytes:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not cost us the report
        text = f"<str() of {type(exc).__name__} failed>"
    return pickle.dumps((kind, type(exc).__name__, text, traceback.format_exc()))


def _resolve(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"initializer {spec!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _rank_main(spec: _RankSpec, conn) -> None:
    """Body of one rank process: init the world, then serve tasks until told to stop."""
    global _IN_RANK
    _IN_RANK = True
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

        timeout = datetime.timedelta(seconds=spec.pg_timeout_s)
        store = dist.TCPStore(_STORE_HOST, spec.store_port, None, False, timeout)
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
        )
        if spec.initializer:
            _resolve(spec.initializer)(ctx)
        reply = pickle.dumps(("ok", 0, pickle.dumps(os.getpid())))
    except BaseException as exc:
        reply = _error_message("err", exc)
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
        msg = pickle.loads(data)  # from the owner's own pickler: trusted shape
        if msg[0] == "stop":
            break
        _, task_id, payload = msg
        try:
            fn, args, kwargs = pickle.loads(payload)
            value = fn(ctx, *args, **kwargs)
            try:
                blob = dumps(value)
            except BaseException as exc:
                raise TypeError(
                    f"the result of the task on rank {ctx.rank} ({type(value).__name__}) cannot be pickled "
                    f"for the parent: {exc}"
                ) from exc
            reply = pickle.dumps(("ok", task_id, blob))
        except BaseException as exc:  # SystemExit too: a task must not end the rank silently
            reply = _error_message("err", exc)
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


# ----------------------------------------------------------- owner side ----


@dataclasses.dataclass
class _Outcome:
    reports: dict  # rank -> decoded message tuple
    dead: dict  # rank -> exitcode
    pending: list  # ranks neither reported nor dead
    elapsed: float


def _task_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _indent(text: str) -> str:
    return "".join("    " + line + "\n" for line in text.rstrip("\n").splitlines()) or "    <empty>\n"


class _MainGuardError(RuntimeError):
    """A rank process re-imported a ``__main__`` that starts rank pools."""


def _refuse_inside_rank() -> None:
    """Raise if this process is a rank: pools are started by the owner only.

    Two cases. While a rank re-imports the owner's ``__main__`` (forkserver
    children run it as ``__mp_main__`` before ``_rank_main``), multiprocessing
    marks the process ``_inheriting`` and has already given it our rank's
    name: that is a script missing its ``__main__`` guard. The error then
    also ends the rank with ``_MAIN_GUARD_EXIT_CODE`` (multiprocessing would
    print a traceback and exit 1), so the owner's pool start names the cause.
    Later (a task or initializer starting a pool) ``_IN_RANK`` is set.
    """
    if _IN_RANK:
        raise RuntimeError(
            "lora-harness: a rank pool cannot be started inside a rank process (from a task or an "
            "initializer); start pools in the process that owns them"
        )
    proc = multiprocessing.current_process()
    if getattr(proc, "_inheriting", False) and str(proc.name).startswith(_RANK_NAME_PREFIX):
        _exit_rank_on_uncaught(_MainGuardError)
        raise _MainGuardError(MAIN_GUARD_MESSAGE)


def _exit_rank_on_uncaught(exc_type: type) -> None:
    """Make an uncaught ``exc_type`` print one line and exit with ``_MAIN_GUARD_EXIT_CODE``.

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
                os._exit(_MAIN_GUARD_EXIT_CODE)
        previous(etype, value, tb)

    sys.excepthook = hook


def _ceiling_of(timeout) -> float:
    return DEFAULT_TIMEOUT_S if timeout is None else _seconds("timeout", timeout)


def _release(pool_dir: str, owner_pid: int, fds: list) -> None:
    """Close the owner's output fds and remove the pool's directory (owner only; once)."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner: the directory is not ours
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    shutil.rmtree(pool_dir, ignore_errors=True)


class RankPool:
    """A persistent world of ``world_size`` rank processes on ``backend``.

    See the module docstring for the task contract, the output capture and
    the timeout policy. ``timeout`` is the ceiling (default
    ``DEFAULT_TIMEOUT_S``) and the process-group timeout. ``error_grace`` is
    how long, after a rank's error, the ranks that have not reported yet may
    take before they are declared blocked (default ``ERROR_GRACE_S``; not
    waited when every rank has reported). ``initializer`` is
    ``"module:function"``, called as ``function(ctx)`` on every rank once the
    process group exists. A task cannot take a keyword argument named
    ``timeout``: ``run`` consumes it.

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
    ):
        _refuse_inside_rank()
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        self._ceiling = _ceiling_of(timeout)
        self.error_grace = _seconds("error_grace", error_grace, allow_zero=True)
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
        self._dir: str | None = None
        self._release_dir = None  # weakref.finalize: runs once, at retire, GC or exit
        self._out_fds: list[int] = []  # owner's read/write fd of each rank's output file
        self._out_offsets: list[int] = []  # how far the owner has read each of them
        self.last_output: dict[int, str] = {}
        self._task_id = 0
        self.tasks_run = 0
        self.retire_reason: str | None = None
        _install_sigterm_handler()
        _live_pools.add(self)
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
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{self.world_size}-")
        self._release_dir = weakref.finalize(self, _release, self._dir, self.owner_pid, self._out_fds)
        for rank in range(self.world_size):
            self._out_fds.append(os.open(self._output_path(rank), os.O_RDWR | os.O_CREAT, 0o600))
            self._out_offsets.append(0)
        self._store = dist.TCPStore(
            _STORE_HOST, 0, None, True, datetime.timedelta(seconds=ceiling), wait_for_workers=False
        )
        # Held while forking so no other thread restarts the fork server
        # between our check for its children and our own forks.
        with _forkserver_lock:
            _short_socket_dir()
            _prepare_forkserver(self.preload)
            self._spawn_ranks(ctx, ceiling)
        label = f"start of a {self.world_size}-rank {self.backend} pool (initializer={self.initializer!r})"
        outcome = self._collect(list(range(self.world_size)), time.monotonic() + ceiling)
        self._raise_if_fault(outcome, label, ceiling, "the ceiling bounds a pool start")

    def _output_path(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.output")

    def _spawn_ranks(self, ctx, ceiling: float) -> None:
        for rank in range(self.world_size):
            spec = _RankSpec(
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
                stack_file=os.path.join(self._dir, f"rank{rank}.stacks"),
                output_file=self._output_path(rank),
                pool_dir=self._dir,
            )
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_rank_main,
                args=(spec, child_end),
                # The prefix also tells _refuse_inside_rank that a process
                # re-importing __main__ is one of our ranks.
                name=f"{_RANK_NAME_PREFIX}{rank}of{self.world_size}-{self.backend}",
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
                limit, policy = _seconds("timeout", timeout), "explicit timeout= argument"
            else:
                limit = self.next_timeout
                policy = (
                    f"adaptive: min(ceiling {self._ceiling:g} s, max({ADAPTIVE_FLOOR_S:g} s, "
                    f"{ADAPTIVE_FACTOR:g} x slowest successful task "
                    f"{_slowest_ok_s.get((self.world_size, self.backend), 0.0):.3f} s)); "
                    f"raise it with run(..., timeout=) or the pool's timeout="
                )
            name = _task_name(fn)
            try:
                payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise TypeError(
                    f"task {name} or its arguments cannot be pickled for the rank processes "
                    f"(tasks must be top-level functions of an importable module): {exc}"
                ) from exc
            self._task_id += 1
            message = pickle.dumps(("run", self._task_id, payload), protocol=pickle.HIGHEST_PROTOCOL)
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
            _record_success(self.world_size, self.backend, waited)
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
        reports: dict = {}
        dead: dict = {}
        by_conn = {self._conns[r]: r for r in ranks}
        by_sentinel = {self._procs[r].sentinel: r for r in ranks}
        closed: set[int] = set()  # ranks whose pipe hit EOF: wait for the sentinel
        fault_at: float | None = None
        grace = self.error_grace

        def take(rank: int, data: bytes) -> None:
            nonlocal fault_at
            try:
                msg = pickle.loads(data)
            except Exception as exc:  # only our own tuples travel here
                msg = ("err", type(exc).__name__, f"undecodable message from rank {rank}: {exc}", "")
            reports[rank] = msg
            pending.discard(rank)
            if msg[0] != "ok" and fault_at is None:
                fault_at = time.monotonic()

        while pending:
            now = time.monotonic()
            limit = deadline if fault_at is None else min(deadline, fault_at + grace)
            if now >= limit:
                break
            waitables = [self._conns[r] for r in pending if r not in closed]
            waitables += [self._procs[r].sentinel for r in pending]
            for obj in multiprocessing.connection.wait(waitables, timeout=limit - now):
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
        return _Outcome(reports, dead, sorted(pending), time.monotonic() - started)

    def _raise_if_fault(self, outcome: _Outcome, label: str, limit: float, policy: str) -> list:
        errors: dict = {}
        results: list = [None] * self.world_size
        for rank, msg in sorted(outcome.reports.items()):
            if msg[0] == "ok":
                try:
                    results[rank] = pickle.loads(msg[2])
                except Exception as exc:  # not BaseException: Ctrl-C here is the user's, not the rank's
                    errors[rank] = (
                        type(exc).__name__,
                        f"the result of rank {rank} could not be unpickled in the parent: {exc}",
                        traceback.format_exc(),
                    )
            else:
                errors[rank] = tuple(msg[1:4])
        if not errors and not outcome.dead and not outcome.pending:
            self.last_output = self._read_output(may_reset=True)
            return results

        pids = self.pids
        if outcome.pending and not outcome.dead and not errors:
            stacks = self._dump_stacks(list(range(self.world_size)))
        else:
            stacks = self._dump_stacks(outcome.pending) if outcome.pending else {}
        output = self._read_output()
        self.last_output = output
        self._retire(f"fault in {label}")

        lines = []
        if any(code == _MAIN_GUARD_EXIT_CODE for code in outcome.dead.values()):
            lines.append(MAIN_GUARD_MESSAGE)
        if outcome.dead:
            head = ", ".join(f"rank {r} (pid {pids[r]}) exited with code {_describe_exit(c)}" for r, c in sorted(outcome.dead.items()))
            lines.append(f"RankCrash in {label}: {head}.")
        elif errors:
            lines.append(
                f"RankTaskError in {label}: "
                + "; ".join(f"rank {r} raised {t}: {m}" for r, (t, m, _) in sorted(errors.items()))
            )
        else:
            reported = [r for r in range(self.world_size) if r not in outcome.pending]
            lines.append(
                f"RankHang in {label}: rank(s) {outcome.pending} did not report within {limit:.3g} s"
                f" (reported: {reported or 'none'}). Timeout policy: {policy}."
            )
        for rank, (etype, msg, tb) in sorted(errors.items()):
            lines.append(f"--- rank {rank} (pid {pids[rank]}) raised {etype}: {msg}")
            lines.append(_indent(tb or "<no traceback>"))
        for rank in sorted(stacks):
            why = "pending, no report" if rank in outcome.pending else "had reported"
            if (errors or outcome.dead) and rank in outcome.pending:
                why = f"no report within {self.error_grace:g} s after the first fault: blocked"
            lines.append(f"--- Python stacks of rank {rank} (pid {pids[rank]}, {why}):")
            lines.append(_indent(stacks[rank]))
        for rank, text in sorted(output.items()):
            if not text:
                continue
            printed = text.rstrip("\n").splitlines()
            tail = printed[-OUTPUT_TAIL_LINES:]
            which = f"last {len(tail)} of {len(printed)} lines" if len(tail) < len(printed) else f"{len(printed)} line(s)"
            lines.append(f"--- output of rank {rank} (pid {pids[rank]}) during this task, {which} (all: .output[{rank}]):")
            lines.append(_indent("\n".join(tail)))
        lines.append(
            f"The pool was retired (all {self.world_size} rank processes killed); "
            f"the next get_pool({self.world_size}, {self.backend!r}) starts a fresh one."
        )
        report = "\n".join(lines)
        if outcome.dead:
            fault: RankPoolFault = RankCrash(report, dict(outcome.dead), errors, stacks)
        elif errors:
            fault = RankTaskError(report, errors, stacks, list(outcome.pending))
        else:
            fault = RankHang(report, stacks, list(outcome.pending), limit)
        fault.output = output
        raise fault

    def _read_output(self, may_reset: bool = False) -> dict[int, str]:
        """``{rank: text}`` each rank printed since the last read (the last ``OUTPUT_KEEP_BYTES``).

        ``may_reset``: every rank is idle (it reported), so a file past
        ``_OUTPUT_FILE_RESET_BYTES`` can be emptied; the ranks append, so
        they simply continue at its new end.
        """
        output: dict[int, str] = {}
        for rank, fd in enumerate(self._out_fds):
            start = self._out_offsets[rank]
            try:
                size = os.fstat(fd).st_size
                if size < start:
                    start = 0  # emptied by someone else
                keep_from = max(start, size - OUTPUT_KEEP_BYTES)
                data = os.pread(fd, size - keep_from, keep_from) if size > keep_from else b""
            except OSError as exc:
                output[rank] = f"<could not read the output of rank {rank}: {exc}>"
                continue
            self._out_offsets[rank] = keep_from + len(data)
            text = data.decode("utf-8", "replace")
            if keep_from > start:
                text = (
                    f"[lora-harness: the first {keep_from - start} bytes of rank {rank}'s output "
                    f"during this task were dropped; the last {len(data)} follow]\n" + text
                )
            output[rank] = text
            if may_reset and self._out_offsets[rank] > _OUTPUT_FILE_RESET_BYTES:
                try:
                    os.ftruncate(fd, 0)
                    self._out_offsets[rank] = 0
                except OSError:
                    pass
        return output

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        """Ask ``ranks`` for their Python stacks (faulthandler on SIGUSR1) and read them."""
        paths = {r: os.path.join(self._dir, f"rank{r}.stacks") for r in ranks}
        offsets = {r: _file_size(paths[r]) for r in ranks}
        stacks: dict[int, str] = {}
        signalled = []
        for r in ranks:
            proc = self._procs[r]
            if not proc.is_alive():
                stacks[r] = f"<process exited with code {_describe_exit(proc.exitcode)}>"
                continue
            try:
                os.kill(proc.pid, signal.SIGUSR1)
                signalled.append(r)
            except ProcessLookupError:
                stacks[r] = "<process vanished before its stack could be dumped>"
        # faulthandler writes from the signal handler, even while the main
        # thread sits in C code; wait until every file has grown and settled.
        deadline = time.monotonic() + STACK_DUMP_WAIT_S
        last = {r: -1 for r in signalled}
        while signalled and time.monotonic() < deadline:
            time.sleep(0.05)
            sizes = {r: _file_size(paths[r]) for r in signalled}
            if all(sizes[r] > offsets[r] and sizes[r] == last[r] for r in signalled):
                break
            last = sizes
        for r in signalled:
            try:
                with open(paths[r], "rb") as f:
                    f.seek(offsets[r])
                    text = f.read().decode("utf-8", "replace")
            except OSError as exc:
                text = f"<could not read the stack dump: {exc}>"
            stacks[r] = text or f"<no stack dump within {STACK_DUMP_WAIT_S:g} s>"
        return stacks

    # -- shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the ranks: ask politely, join briefly, then SIGKILL. Idempotent."""
        with self._lock:
            if not self._retired:
                self._retire("shut down", graceful=True)

    def _retire(self, reason: str, graceful: bool = False) -> None:
        self._retired = True
        self.retire_reason = reason
        _live_pools.discard(self)
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the owner: these ranks are not ours to kill
        started = [proc for proc in self._procs if proc.pid is not None]
        try:
            if graceful:
                stop = pickle.dumps(("stop",))
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
                if self._release_dir is not None:
                    self._release_dir()


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


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _describe_exit(code) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    if code == _WATCHDOG_EXIT_CODE:
        return f"{code} (its owner process vanished)"
    if code == _MAIN_GUARD_EXIT_CODE:
        return (
            f"{code} (re-importing the owner's __main__ started a rank pool: "
            'missing `if __name__ == "__main__":` guard)'
        )
    return str(code)


# ----------------------------------------------------------- fork server ---

# What the running fork server imported, when we started it; None if we did
# not (not started yet, or started by other code with unknown preload).
_forkserver_preload: frozenset | None = None
_forkserver_lock = threading.Lock()


def _short_socket_dir() -> None:
    """Give multiprocessing a short temporary directory when ``TMPDIR`` is long.

    The fork server listens on a Unix socket under multiprocessing's temp dir
    (``<TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX``), and a socket path has at
    most 107 bytes: a deep ``TMPDIR`` (pytest's numbered ``tmp_path`` dirs)
    makes every pool start fail with ``OSError: AF_UNIX path too long``.
    """
    from multiprocessing import process, util

    config = process.current_process()._config
    if config.get("tempdir") is not None or len(tempfile.gettempdir()) <= 48:
        return
    short = tempfile.mkdtemp(prefix="pymp-", dir="/tmp" if os.path.isdir("/tmp") else None)
    config["tempdir"] = short
    util.Finalize(None, shutil.rmtree, args=[short], kwargs={"ignore_errors": True}, exitpriority=-100)


def _prepare_forkserver(preload: tuple) -> None:
    """Make the fork server preload ``preload`` if that can be had cheaply.

    Called with ``_forkserver_lock`` held.

    The fork server is one per process and imports its preload list once, at
    its start. Before it starts, the list is set to the union of everything
    asked so far. If it already runs without some of ``preload`` and has no
    children (no live rank anywhere in this process), it is restarted with
    the union, so e.g. a test that started it with only torch does not make
    every later megatron pool re-import megatron in each rank. With live
    children it is left alone: ranks import what is missing themselves,
    correct but slower to start.
    """
    global _forkserver_preload
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = server._forkserver_pid
    if pid is not None and _process_exists(pid):
        if _forkserver_preload is not None and set(preload) <= _forkserver_preload:
            return
        if not hasattr(server, "_stop") or _children_of(pid):
            return
        # No child holds the server's "alive" pipe: it exits at once.
        server._stop()
    merged = tuple(dict.fromkeys([*sorted(_forkserver_preload or ()), *preload]))
    forkserver.set_forkserver_preload(list(merged))
    _forkserver_preload = frozenset(merged)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # not waitpid: that would steal the reap from multiprocessing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_of(pid: int) -> list[int]:
    """Live children of ``pid``; ``[-1]`` (busy) where /proc cannot tell."""
    if not os.path.isdir("/proc"):
        return [-1]  # assume busy: a restart must never block on a child
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry))
    return children


# ---------------------------------------------------------------- cache ----

_pools: dict[tuple[int, str], RankPool] = {}
_pools_lock = threading.Lock()
# Every pool of this process not yet retired, get_pool's or not: what
# shutdown_all and the SIGTERM handler clean up.
_live_pools: "weakref.WeakSet[RankPool]" = weakref.WeakSet()


def get_pool(world_size: int, backend: str = "gloo", **kw) -> RankPool:
    """The live pool for ``(world_size, backend)`` in this process, started if needed.

    ``kw`` are :class:`RankPool`'s keyword arguments. A retired or dead pool
    is replaced transparently; so is one started with different
    ``initializer``/``preload``/``timeout`` (``None`` and
    ``DEFAULT_TIMEOUT_S`` are the same), since its ranks would run tasks in
    the wrong environment or with the wrong process-group timeout.
    ``error_grace`` only concerns the owner, so a live pool just takes the
    value of the latest call (default ``ERROR_GRACE_S``).
    """
    _refuse_inside_rank()
    key = (world_size, backend)
    wanted = (kw.get("initializer"), tuple(kw.get("preload", ("torch",))), _ceiling_of(kw.get("timeout")))
    grace = _seconds("error_grace", kw.get("error_grace", ERROR_GRACE_S), allow_zero=True)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None and pool.owner_pid != os.getpid():
            _pools.clear()  # inherited by fork: those ranks belong to the parent
            pool = None
        if pool is not None:
            if not pool.alive or pool._config() != wanted:
                pool.shutdown()
                pool = None
        if pool is None:
            pool = RankPool(world_size, backend, **kw)
            _pools[key] = pool
        else:
            pool.error_grace = grace
        return pool


def shutdown_all() -> None:
    """Shut down every pool this process started (registered with atexit).

    Pools made with ``RankPool(...)`` directly are included, so their
    temporary directories go too.
    """
    me = os.getpid()
    with _pools_lock:
        pools = [p for p in _pools.values() if p.owner_pid == me]
        _pools.clear()
    pools += [p for p in list(_live_pools) if p.owner_pid == me and p not in pools]
    for pool in pools:
        pool.shutdown()


atexit.register(shutdown_all)


# ---------------------------------------------------------------- SIGTERM ---

_sigterm_handler_installed = False


def _install_sigterm_handler() -> None:
    """Clean up on SIGTERM of the owner, if SIGTERM is ours to handle.

    Only where its action is still the default (terminate, no cleanup) and
    only from the main thread (``signal.signal`` requires it). See the module
    docstring for why the handler re-raises SIGTERM instead of exiting.
    """
    global _sigterm_handler_installed
    if _sigterm_handler_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, TypeError):
        return
    _sigterm_handler_installed = True


def _on_sigterm(signum, frame) -> None:
    try:
        _kill_everything_now()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before kill() returns: we die by SIGTERM
        os._exit(128 + signal.SIGTERM)  # not reached


def _kill_everything_now() -> None:
    """SIGKILL every rank of this process's pools and remove their directories.

    Runs in a signal handler: takes no lock (the interrupted main thread may
    hold any of them) and waits for nothing; the fork server reaps the ranks.
    """
    me = os.getpid()
    try:
        pools = [p for p in list(_live_pools) if p.owner_pid == me]
    except RuntimeError:  # the set changed meanwhile: take what the cache has
        pools = [p for p in list(_pools.values()) if p.owner_pid == me]
    for pool in pools:
        for proc in list(pool._procs):
            popen = getattr(proc, "_popen", None)
            if popen is not None and popen.returncode is None:
                try:
                    os.kill(popen.pid, signal.SIGKILL)
                except OSError:
                    pass
    for pool in pools:
        if pool._dir:
            shutil.rmtree(pool._dir, ignore_errors=True)
