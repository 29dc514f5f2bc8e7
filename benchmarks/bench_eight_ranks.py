"""Eight ranks on one box: the properties at the 8-rank layouts, with each rank's memory.

    .venv/bin/python benchmarks/bench_eight_ranks.py [--examples 2] [--property forward_matches ...]
                                                     [--family gpt|moe ...] [--layout NAME ...] [--quick]

The 8-rank layouts are those of ``--tp 8``, ``--tp 4 --ep 2`` and
``--tp 2 --ep 4`` whose world is 8 ranks (dense: tp8, tp4-ep2 and tp2-ep4,
each with and without sequence parallelism; MoE: tp8 at every ETP,
tp4-ep2 and tp2-ep4 with ETP = TP and ETP = 1). ``--quick``: one dense and
one MoE layout with ETP != TP. After each layout it prints the time per
property and the memory of the 8 ranks, read from ``/proc`` by the owner
(``RankPool.memory``): peak resident set (VmHWM, which counts the pages a
rank shares with the fork server and its peers) and proportional set size
(PSS: shared pages divided among the processes sharing them, i.e. what a
rank really adds). Figures only; the target is at most 300 MB per rank.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_MB = 300.0


def eight_rank_layouts(family: str) -> list:
    from harness.settings import layout_set

    seen = {}
    for tp, ep in ((8, 1), (4, 2), (2, 4)):
        for layout in layout_set(tp, ep, family):
            if layout.min_world_size == 8:
                seen.setdefault(layout.describe(), layout)
    return list(seen.values())


def memory_summary(pool) -> dict:
    """max and median over the ranks of peak RSS and of PSS, in MiB."""
    mem = [m for m in pool.memory() if m]
    hwm = [m.get("hwm", 0.0) for m in mem]
    pss = [m.get("pss", 0.0) for m in mem]
    rss = [m.get("rss", 0.0) for m in mem]
    threads = [m.get("threads", 0) for m in mem]
    return dict(ranks=len(mem), threads_max=max(threads), hwm_max=max(hwm), hwm_median=statistics.median(hwm), rss_max=max(rss),
                pss_max=max(pss), pss_median=statistics.median(pss))


def run(examples: int, props, families, only, seed: int = 0, printer=print) -> list:
    """Check ``props`` at the 8-rank layouts; one row per (family, layout) with times and memory."""
    from hypothesis import settings

    from harness.driver import check_property
    from harness.plan import layout_seed
    from harness.runs import Executor

    executor = Executor()
    rows = []
    for family in families:
        for layout in eight_rank_layouts(family):
            if only and layout.describe() not in only:
                continue
            run_settings = settings(max_examples=examples, database=None, deadline=None)
            started = time.monotonic()
            verdicts, n = {}, 0
            for prop in props:
                outcome = check_property(prop, layout, settings=run_settings, executor=executor, family=family,
                                         seed=layout_seed(seed, layout, family))
                verdicts[prop] = outcome.verdict.value
                if not outcome.passed:
                    printer(f"  {prop} at {family}:{layout.describe()}: {outcome.verdict.value}: {outcome.error}"[:4000])
                    if outcome.replay_command:
                        printer(f"  replay: {outcome.replay_command}")
                n = max(n, outcome.examples)
            seconds = time.monotonic() - started
            pool = executor.pool(layout.min_world_size)
            row = dict(family=family, layout=layout.describe(), world=pool.world_size, examples=n, seconds=seconds,
                       verdicts=verdicts, **memory_summary(pool))
            rows.append(row)
            printer(
                f"{family:<4} {row['layout']:<26} world {row['world']}  {n} ex  {seconds:6.1f} s "
                f"({seconds / max(n, 1) / max(len(props), 1):5.1f} s/ex/prop)  peak RSS max {row['hwm_max']:5.0f} MiB "
                f"median {row['hwm_median']:5.0f}  PSS max {row['pss_max']:5.0f} median {row['pss_median']:5.0f}  threads {row['threads_max']}  "
                + " ".join(f"{p}={v}" for p, v in verdicts.items()),
                flush=True,
            )
    return rows


def main() -> None:
    from harness import _quiet
    from harness.properties import registry
    from harness.pool import shutdown_all

    _quiet.quiet_parent()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--property", dest="properties", action="append", default=None)
    p.add_argument("--family", dest="families", action="append", default=None, choices=("gpt", "moe"))
    p.add_argument("--layout", dest="layouts", action="append", default=None)
    p.add_argument("--quick", action="store_true", help="tp8 dense and tp2-ep4-etp1 MoE only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    props = args.properties or [name for name in registry() if name != "init_follows_distribution"]
    families = args.families or ["gpt", "moe"]
    only = set(args.layouts or ())
    if args.quick:
        only |= {"tp8-ep1-etp8-pp1", "tp2-ep4-etp1-pp1-dp4-sp"}
    print(f"cpus {os.cpu_count()}, properties {', '.join(props)}, {args.examples} examples per property and layout")
    try:
        rows = run(args.examples, props, families, only, args.seed)
    finally:
        shutdown_all()
    if rows:
        worst = max(r["hwm_max"] for r in rows)
        worst_pss = max(r["pss_max"] for r in rows)
        print(f"\nper-rank memory over {len(rows)} 8-rank layouts: peak RSS max {worst:.0f} MiB, PSS max {worst_pss:.0f} MiB; "
              f"target <= {TARGET_MB:.0f} MB per rank: {'met' if worst_pss <= TARGET_MB else 'NOT met'} (PSS), "
              f"{'met' if worst <= TARGET_MB else 'NOT met'} (RSS)")
        failing = [(r["layout"], p, v) for r in rows for p, v in r["verdicts"].items() if v not in ("pass", "skipped", "advisory")]
        print("verdicts: all pass" if not failing else f"verdicts NOT all pass: {failing}")


if __name__ == "__main__":
    main()
