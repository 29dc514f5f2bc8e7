"""Print what a property example costs, and how long planted faults take to report.

    .venv/bin/python benchmarks/bench_properties.py [--examples 50] [--ep 2] [--faults | --faults-only]

Figures only, no thresholds. ``--faults`` runs forward_matches against
``tests.wrong_impls.crashes_on_rank1`` (a rank dies), ``raises_in_forward`` (a
rank raises while its peer waits in a collective) and ``hangs_on_rank1`` with the default
timeout policy, shrinking included: the target is a report within 30 s per
property for a crash or a raise on 2 cores.
"""

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
    from harness.properties import registry
    from harness.pool import shutdown_all
    from harness.settings import layout_set

    _quiet.quiet_parent()
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--faults", action="store_true", help="also time planted faults")
    p.add_argument("--faults-only", action="store_true", help="only time planted faults")
    args = p.parse_args()
    run = settings(max_examples=args.examples, database=None, deadline=None)
    try:
        for layout in [] if args.faults_only else layout_set(args.tp, args.ep):
            for prop in registry():
                outcome = check_property(prop, layout, settings=run)
                per = outcome.seconds / max(outcome.examples, 1)
                print(f"{prop:<22} {layout.describe():<20} {outcome.examples:>4} examples {outcome.seconds:6.1f}s  "
                      f"{per * 1000:7.1f} ms/example  worst err/tol {outcome.worst_ratio:.1e}  {outcome.verdict.value}", flush=True)
        if args.faults or args.faults_only:
            from harness.layouts import ParallelLayout

            for impl in ("tests.wrong_impls.crashes_on_rank1", "tests.wrong_impls.raises_in_forward", "tests.wrong_impls.hangs_on_rank1"):
                start = time.monotonic()
                outcome = check_property("forward_matches", ParallelLayout(tp=2), impl, settings=run)
                print(f"{impl}: {outcome.verdict.value} reported after {time.monotonic() - start:.1f}s "
                      f"({outcome.examples} examples run, shrinking included)", flush=True)
    finally:
        shutdown_all()


if __name__ == "__main__":
    main()
