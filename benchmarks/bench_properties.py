"""Print what a property example costs, and how long a planted hang takes to report.

    .venv/bin/python benchmarks/bench_properties.py [--examples 50] [--hang]

Figures only, no thresholds. ``--hang`` runs forward_matches against
``tests.wrong_impls.hangs_on_rank1`` with the runner's *default* timeout
policy, to show that a planted hang ends within minutes even while
hypothesis shrinks.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    from hypothesis import settings

    from harness.layouts import ParallelLayout
    from harness.properties import PROPERTIES, check_property
    from harness.runner import shutdown_all

    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--hang", action="store_true")
    args = p.parse_args()
    run = settings(max_examples=args.examples, database=None, deadline=None)
    try:
        for layout in (ParallelLayout(), ParallelLayout(tp=2)):
            for prop in PROPERTIES:
                outcome = check_property(prop, layout, settings=run)
                per = outcome.seconds / max(outcome.examples, 1)
                print(f"{prop:<22} {layout.describe():<20} {outcome.examples:>4} examples {outcome.seconds:6.1f}s  {per*1000:7.1f} ms/example  worst rel err {max(outcome.worst.values(), default=0):.1e}")
        if args.hang:
            start = time.monotonic()
            outcome = check_property("forward_matches", ParallelLayout(tp=2), "tests.wrong_impls.hangs_on_rank1", settings=run)
            print(f"planted hang: reported after {time.monotonic() - start:.1f}s ({outcome.examples} examples run), {type(outcome.exception).__name__}")
    finally:
        shutdown_all()


if __name__ == "__main__":
    main()
