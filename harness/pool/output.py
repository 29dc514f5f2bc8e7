"""The pool's directory, read by the owner: what each rank printed, and its Python stacks on demand.

This module's one job is the owner's side of the per-rank files in a
pool's temporary directory (``lora-harness-ws<N>-*``).

Each rank points its file descriptors 1 and 2 (``os.dup2``, so C-level and
subprocess output is caught too) at one file per rank in that directory;
nothing a task prints reaches the parent's terminal. After every task (and
the pool start) the parent reads what each rank printed during it
(:meth:`RankFiles.read_output`): ``pool.last_output`` is ``{rank: text}``,
keeping the last ``OUTPUT_KEEP_BYTES`` (64 KiB) with a marker when more was
printed. Fault exceptions carry the same dict as ``output``, and their
report ends with the last ``OUTPUT_TAIL_LINES`` lines of each rank's output.

A rank's Python stacks are dumped by ``faulthandler`` on ``SIGUSR1`` into
its stack file (:meth:`RankFiles.dump_stacks`).

The directory is removed once, by whichever comes first: the pool's
retirement, its garbage collection, or the ranks' watchdog when the owner
vanished.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import weakref

from harness.pool.faults import describe_exit

__all__ = ["RankFiles", "OUTPUT_KEEP_BYTES", "STACK_DUMP_WAIT_S", "DIR_PREFIX"]

DIR_PREFIX = "lora-harness-ws"
# Rank output kept per task (the end of it).
OUTPUT_KEEP_BYTES = 64 * 1024
# A rank's output file is emptied (between tasks) once it grows past this.
_OUTPUT_FILE_RESET_BYTES = 8 * 1024 * 1024
# How long the parent waits for faulthandler to finish writing stacks.
STACK_DUMP_WAIT_S = 2.0


class RankFiles:
    """A pool's directory with one output file and one stack file per rank.

    Made by the pool's owner; ``release`` (a ``weakref.finalize`` on
    ``owner``) closes the owner's descriptors and removes the directory,
    once: at retirement, when ``owner`` is collected, or at exit.
    """

    def __init__(self, world_size: int, owner_pid: int, owner: object) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{world_size}-")
        self._fds: list[int] = []  # owner's read/write fd of each rank's output file
        self._offsets: list[int] = []  # how far the owner has read each of them
        self.release = weakref.finalize(owner, _release, self.dir, owner_pid, self._fds)
        try:
            for rank in range(world_size):
                self._fds.append(os.open(self.output_path(rank), os.O_RDWR | os.O_CREAT, 0o600))
                self._offsets.append(0)
        except BaseException:
            self.release()
            raise

    def output_path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank}.output")

    def stack_path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank}.stacks")

    def read_output(self, may_reset: bool = False) -> dict[int, str]:
        """``{rank: text}`` each rank printed since the last read (the last ``OUTPUT_KEEP_BYTES``).

        ``may_reset``: every rank is idle (it reported), so a file past
        ``_OUTPUT_FILE_RESET_BYTES`` can be emptied; the ranks append, so
        they simply continue at its new end.
        """
        output: dict[int, str] = {}
        for rank, fd in enumerate(self._fds):
            start = self._offsets[rank]
            try:
                size = os.fstat(fd).st_size
                if size < start:
                    start = 0  # emptied by someone else
                keep_from = max(start, size - OUTPUT_KEEP_BYTES)
                data = os.pread(fd, size - keep_from, keep_from) if size > keep_from else b""
            except OSError as exc:
                output[rank] = f"<could not read the output of rank {rank}: {exc}>"
                continue
            self._offsets[rank] = keep_from + len(data)
            text = data.decode("utf-8", "replace")
            if keep_from > start:
                text = (
                    f"[lora-harness: the first {keep_from - start} bytes of rank {rank}'s output "
                    f"during this task were dropped; the last {len(data)} follow]\n" + text
                )
            output[rank] = text
            if may_reset and self._offsets[rank] > _OUTPUT_FILE_RESET_BYTES:
                try:
                    os.ftruncate(fd, 0)
                    self._offsets[rank] = 0
                except OSError:
                    pass
        return output

    def dump_stacks(self, procs: list, ranks: list[int]) -> dict[int, str]:
        """Ask ``ranks`` (``procs`` are every rank's processes) for their Python stacks and read them."""
        paths = {r: self.stack_path(r) for r in ranks}
        offsets = {r: _file_size(paths[r]) for r in ranks}
        stacks: dict[int, str] = {}
        signalled = []
        for r in ranks:
            proc = procs[r]
            if not proc.is_alive():
                stacks[r] = f"<process exited with code {describe_exit(proc.exitcode)}>"
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


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
