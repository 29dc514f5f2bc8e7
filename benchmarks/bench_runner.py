"""Print what the rank pool costs: pool start, task round trip, fault reporting, replacement after a fault.

    .venv/bin/python benchmarks/bench_runner.py [--preload torch,megatron.core] [--repeats 200]

Figures only, no thresholds: they tell whether a hypothesis example on a
pool is cheap enough to run hundreds of them.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.pool import RankCrash, RankPool, RankTaskError, get_pool, shutdown_all, task_timeout  # noqa: E402


def noop(ctx):
    return ctx.rank


def all_reduce_rank(ctx):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return t.item()


def echo(ctx, tensor):
    return tensor


def fail_rank_1_while_rank_0_waits_in_barrier(ctx):
    import torch.distributed as dist

    if ctx.rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()
    return ctx.rank


def fail_everywhere(ctx):
    raise ValueError(f"planted failure on rank {ctx.rank}")


def print_a_line(ctx):
    print(f"rank {ctx.rank} says hello")
    return ctx.rank


def crash_rank_0(ctx):
    if ctx.rank == 0:
        os._exit(9)
    return ctx.rank


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", default="torch", help="comma-separated modules the fork server imports")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--world-sizes", default="1,2,4")
    args = parser.parse_args()
    preload = tuple(m for m in args.preload.split(",") if m)
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cpus {os.cpu_count()}, preload {preload}")

    t0 = time.perf_counter()
    first = RankPool(2, preload=preload)
    print(f"first pool start (fork server + preload + 2 ranks): {_ms(time.perf_counter() - t0)}")
    first.shutdown()

    for ws in world_sizes:
        starts = []
        for _ in range(5):
            t0 = time.perf_counter()
            pool = RankPool(ws, preload=preload)
            starts.append(time.perf_counter() - t0)
            pool.shutdown()
        print(f"warm pool start, world {ws}: median {_ms(statistics.median(starts))}  (5 starts)")

    big = torch.randn(256, 1024)  # 1 MiB
    for ws in world_sizes:
        pool = get_pool(ws, preload=preload)
        pool.run(noop)
        med, p90 = _timed(lambda: pool.run(noop), args.repeats)
        print(f"world {ws}: no-op task round trip   median {_ms(med)}  p90 {_ms(p90)}")
        med, p90 = _timed(lambda: pool.run(all_reduce_rank), args.repeats)
        print(f"world {ws}: all_reduce task        median {_ms(med)}  p90 {_ms(p90)}")
        med, p90 = _timed(lambda: pool.run(echo, big), max(10, args.repeats // 10))
        print(f"world {ws}: 1 MiB tensor echo      median {_ms(med)}  p90 {_ms(p90)}")
        med, p90 = _timed(lambda: pool.run(print_a_line), args.repeats)
        print(f"world {ws}: task printing a line   median {_ms(med)}  p90 {_ms(p90)}  (captured in last_output)")

    # Fault reporting: rank 1 raises while rank 0 is blocked in a barrier, so
    # the parent waits error_grace for rank 0 before reporting it blocked;
    # when every rank raises, nothing is waited. Then the pool is replaced.
    for label, task in (
        ("rank 1 raises, rank 0 blocked in barrier", fail_rank_1_while_rank_0_waits_in_barrier),
        ("every rank raises (no one blocked)      ", fail_everywhere),
    ):
        faults, restarts = [], []
        for _ in range(5):
            pool = get_pool(2, preload=preload)
            pool.run(noop)
            t0 = time.perf_counter()
            try:
                pool.run(task)
            except RankTaskError:
                pass
            faults.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            get_pool(2, preload=preload)
            restarts.append(time.perf_counter() - t0)
        print(
            f"world 2: {label}: fault raised after median {_ms(statistics.median(faults))}"
            f" (error_grace {pool.error_grace:g} s); get_pool after it (new pool) median "
            f"{_ms(statistics.median(restarts))}  (5 faults)"
        )

    pool = get_pool(2, preload=preload)
    t0 = time.perf_counter()
    try:
        pool.run(crash_rank_0)
    except RankCrash:
        pass
    detected = time.perf_counter() - t0
    t0 = time.perf_counter()
    get_pool(2, preload=preload).run(noop)
    print(f"crash detected and pool retired: {_ms(detected)}; replacement + first task: {_ms(time.perf_counter() - t0)}")
    print(f"adaptive timeout now (world 2): {task_timeout(2, 'gloo'):.1f} s")
    # Tensors pickled by a rank that imported megatron.core name
    # megatron.core.safe_globals, so unpickling one imports it here.
    print(f"megatron.core imported in this (parent) process: {'megatron.core' in sys.modules}")
    shutdown_all()


if __name__ == "__main__":
    main()
