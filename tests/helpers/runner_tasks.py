"""Task functions for tests/pool/test_runner.py: they run inside rank processes.

They live in an importable module (not in the test file) so the ranks import
them by reference exactly as harness tasks will be imported. Function names
that appear in stack dumps (``planted_*``, ``lonely_all_reduce``) are asserted
on by the tests, so keep them unique.
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def rank_info(ctx):
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "pid": os.getpid(),
        "dist_rank": dist.get_rank(),
        "dist_world_size": dist.get_world_size(),
        "threads": torch.get_num_threads(),
        "ppid": os.getppid(),
    }


def all_reduce_ranks(ctx):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return t.item()


def scaled_by_rank(ctx, tensor, *, offset=0.0):
    return tensor * (ctx.rank + 1) + offset


def count_calls(ctx):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return ctx.state["calls"]


def sum_of_rank_multiples(ctx, x):
    t = torch.tensor([x * (ctx.rank + 1)], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def environment(ctx, env_name):
    return {
        "sys_path": list(sys.path),
        "env": os.environ.get(env_name),
        "initialized": ctx.state.get("initialized"),
        "threads": torch.get_num_threads(),
    }


def imported_in(ctx, name):
    """(pid that imported module ``name``, this rank's pid): preloaded or not."""
    return sys.modules[name].PID_AT_IMPORT, os.getpid()


def import_module(ctx, name):
    __import__(name)
    return sys.modules[name].VALUE


# -- initializers -------------------------------------------------------------


def mark_initialized(ctx):
    # Runs after init_process_group: a collective must work here.
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    ctx.state["initialized"] = (ctx.rank, t.item())


def initializer_failing_on_rank_1(ctx):
    if ctx.rank == 1:
        raise RuntimeError("planted initializer failure on rank 1")


# -- faults -------------------------------------------------------------------


def planted_failure(rank):
    raise ValueError(f"planted failure on rank {rank}")


def fail_on_rank_1(ctx):
    """Rank 1 raises; rank 0 waits for it in a collective that never completes."""
    if ctx.rank == 1:
        planted_failure(ctx.rank)
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return t.item()


def exit_on_rank(ctx, rank, code):
    if ctx.rank == rank:
        sys.stdout.flush()
        os._exit(code)
    t = torch.tensor([1.0])
    dist.all_reduce(t)  # the peer sees the dead rank as a connection error
    return t.item()


def segfault_on_rank(ctx, rank):
    if ctx.rank == rank:
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(60)
    return ctx.rank


def planted_hang(seconds):
    time.sleep(seconds)


def hang_on_rank_1(ctx, seconds=3600):
    if ctx.rank == 1:
        planted_hang(seconds)
    return ctx.rank


def lonely_all_reduce(ctx):
    """Only rank 0 enters the collective, so it blocks; rank 1 returns."""
    if ctx.rank == 0:
        t = torch.tensor([1.0])
        dist.all_reduce(t)
    return ctx.rank


def system_exit_on_rank_0(ctx):
    if ctx.rank == 0:
        sys.exit(3)
    return ctx.rank


def unpicklable_result(ctx):
    return lambda: ctx.rank  # a lambda cannot be pickled by reference


def _explode_on_load(rank):
    raise RuntimeError(f"planted unpickling failure of rank {rank}'s result")


class FailsToUnpickle:
    """Pickles fine on the rank; unpickling calls a function that raises."""

    def __init__(self, rank):
        self.rank = rank

    def __reduce__(self):
        return (_explode_on_load, (self.rank,))


def result_failing_to_unpickle(ctx):
    return FailsToUnpickle(ctx.rank)


def hang_everywhere(ctx, seconds=3600):
    """Every rank busy in a task: only the owner watchdog can end them."""
    planted_hang(seconds)


# -- output capture -----------------------------------------------------------


def chatty(ctx, tag="chatty"):
    """Print through every route a task has: Python, raw fds, C stdio, a subprocess."""
    import ctypes
    import subprocess

    print(f"{tag} python stdout rank {ctx.rank}")
    print(f"{tag} python stderr rank {ctx.rank}", file=sys.stderr)
    os.write(1, f"{tag} fd 1 rank {ctx.rank}\n".encode())
    os.write(2, f"{tag} fd 2 rank {ctx.rank}\n".encode())
    ctypes.CDLL(None).printf(f"{tag} libc printf rank {ctx.rank}\n".encode())  # buffered in C
    subprocess.run(["sh", "-c", f"echo {tag} subprocess stdout rank {ctx.rank}; echo {tag} subprocess stderr rank {ctx.rank} >&2"], check=True)
    return ctx.rank


def print_lines(ctx, n, width=100, rank=None):
    if rank is None or ctx.rank == rank:
        for i in range(n):
            print(f"line {i:06d} " + "x" * (width - 13))
    return ctx.rank


def print_then_fail_on_rank_1(ctx, n=30):
    """Rank 1 prints ``n`` lines and raises; rank 0 prints one and blocks in all_reduce."""
    if ctx.rank == 1:
        for i in range(n):
            print(f"rank 1 progress {i}")
        planted_failure(ctx.rank)
    print("rank 0 entering all_reduce", flush=True)
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return t.item()


def fail_everywhere(ctx):
    """Every rank raises: all report, nothing is blocked."""
    raise ValueError(f"planted failure on every rank ({ctx.rank})")


def fail_on_rank_1_barrier(ctx):
    """Rank 1 raises; rank 0 waits for it in a barrier."""
    if ctx.rank == 1:
        planted_failure(ctx.rank)
    dist.barrier()
    return ctx.rank


# -- Ctrl-C in the parent -----------------------------------------------------


def _interrupt_on_load(rank):
    raise KeyboardInterrupt(f"planted Ctrl-C while unpickling rank {rank}'s result")


class InterruptsOnUnpickle:
    """Unpickling it in the parent raises KeyboardInterrupt, as a Ctrl-C at that moment would."""

    def __init__(self, rank):
        self.rank = rank

    def __reduce__(self):
        return (_interrupt_on_load, (self.rank,))


def result_interrupting_unpickle(ctx):
    return InterruptsOnUnpickle(ctx.rank)


def start_nested_pool(ctx):
    from harness.pool import get_pool

    get_pool(1)


def planted_deadlock_on_rank_1(ctx):
    """Rank 1 waits for an event nobody sets (asleep, no CPU); rank 0 then waits for it in a collective."""
    if ctx.rank == 1:
        import threading

        threading.Event().wait()
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return t.item()


def busy_rank_1_then_all_reduce(ctx, seconds):
    """Rank 1 computes for ``seconds`` while rank 0 waits for it in a collective: slow, not a hang."""
    if ctx.rank == 1:
        end = time.monotonic() + seconds
        x = 0
        while time.monotonic() < end:
            x += 1
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return t.item()


def gloo_groups_and_loop_threads(ctx, groups=12):
    """Make ``groups`` gloo groups over the world, all-reduce in each; (loop threads, the sums, backend types)."""
    from harness.gloo import loop_threads

    made = [dist.new_group(list(range(ctx.world_size)), backend="gloo") for _ in range(groups)]
    sums = []
    for i, group in enumerate(made):
        t = torch.tensor([float(ctx.rank + 1), float(i)])
        dist.all_reduce(t, group=group)
        sums.append(t.tolist())
    kinds = {type(g._get_backend(torch.device("cpu"))).__name__ for g in made}
    threads = loop_threads()
    for group in made:
        dist.destroy_process_group(group)
    return {"threads": threads, "sums": sums, "kinds": sorted(kinds)}
