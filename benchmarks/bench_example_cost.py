"""What one designed example costs, and where its time goes: dense tp2 and MoE tp2-ep2.

    .venv/bin/python benchmarks/bench_example_cost.py [--rows 12] [--property recompute_transparent]

For each cell (``forward_matches``, or ``--property``, at gpt ``tp2`` and at moe ``tp2-ep2-sp``),
after a warm-up that starts the pools: the designed examples run through the
whole harness (``check_property``), and the seconds per example are split
into the rank tasks (the implementation's run at the layout, the world-size-1
reference, the float64 reference for 16-bit cases, the EP=1 run: time spent
waiting on the ranks, which includes their pickling of results) and the
parent's own work (hypothesis, unpickling, gathering shards, comparing).
Figures only, no thresholds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    from hypothesis import settings

    from harness import _quiet
    from harness.driver import check_property
    from harness.layouts import ParallelLayout
    from harness.pool import shutdown_all
    from harness.runs import Executor

    _quiet.quiet_parent()
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=12, help="designed rows per cell (the first N)")
    p.add_argument("--property", default="forward_matches", help="the property whose designed examples are timed")
    args = p.parse_args()
    import harness.design as design

    original = design.designed_rows
    design_rows = lambda *a, **k: original(*a, **k)[: args.rows]  # noqa: E731
    import harness.driver as driver

    driver.designed_rows = design_rows
    one = settings(max_examples=1, database=None, deadline=None)
    cells = [("gpt", ParallelLayout(tp=2)), ("moe", ParallelLayout(tp=2, ep=2, sp=True))]
    try:
        for family, layout in cells:
            executor = Executor()
            # Warm-up: pools of every size this cell uses, imports, first-task timeouts.
            check_property(args.property, layout, settings=one, executor=executor, family=family, designed=False, seed=99)
            waited = [0.0]
            run = executor.run

            def timed(case, task=None):
                start = time.monotonic()
                try:
                    return run(case, task)
                finally:
                    waited[0] += time.monotonic() - start

            executor.run = timed  # type: ignore[method-assign]
            start = time.monotonic()
            outcome = check_property(args.property, layout, settings=one, executor=executor, family=family, seed=1)
            total = time.monotonic() - start
            n = max(outcome.designed, 1)
            print(f"{family} {layout.describe():<24} {n} designed examples: {1000 * total / n:7.1f} ms per example "
                  f"(rank tasks {1000 * waited[0] / n:6.1f} ms, parent {1000 * (total - waited[0]) / n:6.1f} ms)  "
                  f"{outcome.verdict.value}", flush=True)
    finally:
        shutdown_all()


if __name__ == "__main__":
    main()
