"""The fork server rank processes are started from: what it preloads, where its socket lives.

This module's one job is multiprocessing's ``forkserver`` as pools use it.
Ranks are started from the ``forkserver`` context with a pool's
``preload`` imported in the fork server, so a (re)start costs a fork plus a
process-group rendezvous instead of a fresh ``import torch`` per rank. The
fork server is process-global and imports its list once; a pool asking for
more is served by restarting it with the union when no rank is alive, else
its ranks import the rest themselves (correct, slower to start).

The fork server exits by itself when the owner dies (it watches a pipe
whose only writer is the owner), and so does multiprocessing's resource
tracker. Callers hold :data:`forkserver_lock` around
:func:`prepare_forkserver` and their forks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from harness.pool import procfs

__all__ = ["forkserver_lock", "short_socket_dir", "socket_dir", "prepare_forkserver"]

# What the running fork server imported, when we started it; None if we did
# not (not started yet, or started by other code with unknown preload).
_forkserver_preload: frozenset | None = None
forkserver_lock = threading.Lock()


def short_socket_dir() -> None:
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


def socket_dir() -> str | None:
    """This process's multiprocessing temporary directory (the fork server's socket is in it), if made.

    multiprocessing removes it at a normal exit; after a SIGTERM or SIGKILL of
    this process its handler and its ranks do (``lifecycle``, ``rank``).
    """
    from multiprocessing import process

    return process.current_process()._config.get("tempdir")


def prepare_forkserver(preload: tuple) -> None:
    """Make the fork server preload ``preload`` if that can be had cheaply.

    Called with ``forkserver_lock`` held.

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
    if not procfs.available():
        return [-1]  # assume busy: a restart must never block on a child
    return procfs.children_of(pid)
