"""Every pool this process holds, and how they end with it: at exit, on SIGTERM.

This module's one job is cleanup: nothing outlives the owner, and no
``lora-harness-ws*`` temporary directory is left behind. It keeps the
registry of live pools (:func:`track`, :func:`untrack`: every pool, made by
``get_pool`` or directly) and ``get_pool``'s cache (``_pools``, filled by
``harness.pool.cache``), and knows pools only by their ``owner_pid``,
``shutdown()``, ``_procs`` and ``_dir``.

* Normal exit: :func:`shutdown_all` (atexit) stops every pool of this
  process, ``get_pool``'s or constructed directly, and removes its directory.
* A fault or Ctrl-C: the pool retires itself at once (ranks SIGKILLed,
  directory removed).
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
* SIGKILL of the owner: nothing runs in the owner. The ranks' watchdogs
  (``harness.pool.rank``) remove the directory and exit; the fork server
  and multiprocessing's resource tracker exit by themselves.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - imported before our atexit hook so ours runs first (LIFO)
import os
import shutil
import signal
import threading
import weakref
from typing import Any

from harness.pool import forkserver

__all__ = ["track", "untrack", "shutdown_all"]

# get_pool's cache: the live pool per (world_size, backend) (harness.pool.cache).
_pools: dict[tuple[int, str], Any] = {}
_pools_lock = threading.Lock()
# Every pool of this process not yet retired, get_pool's or not: what
# shutdown_all and the SIGTERM handler clean up.
_live_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track(pool: Any) -> None:
    """Register a starting pool, so exit and SIGTERM end it (installs the SIGTERM handler)."""
    _install_sigterm_handler()
    _live_pools.add(pool)


def untrack(pool: Any) -> None:
    """Forget a retired pool."""
    _live_pools.discard(pool)


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
    # The fork server's socket directory: this process dies by SIGTERM next, and
    # multiprocessing's own clean-up runs only at a normal exit. Also when no pool is
    # live any more (the handler exists because this process had one): a CI job
    # cancelled with SIGTERM to its process group often catches a worker between pools.
    socket_dir = forkserver.socket_dir()
    if socket_dir:
        shutil.rmtree(socket_dir, ignore_errors=True)
