"""The harness's cost next to its floor: per-example cost, pool cold start, hang to report.

    .venv/bin/python benchmarks/bench_floor.py [--examples 6] [--skip-hang] [--world-sizes 2,4,8]

Prints one table:

* ``forward_matches`` per example at TP=2 and TP=2 x EP=2, dense (gpt) and
  MoE, through the whole harness (hypothesis draws, the Executor, the
  implementation's run at the layout and the reference's at world size 1,
  the comparison), next to the floor: the very same examples (the cases the
  harness ran, read back from its records) run in a raw ``RankPool`` whose
  ranks stay alive, with a minimal task that builds the megatron model,
  applies ``lora.megatron`` and runs forward (no hypothesis, no dispatch
  layer, no reference run, no weight loading, no records). Both after a
  warm-up, so neither pays for starting pools. The ratio is the harness's
  overhead; the target is at most 3x (printed, never asserted). The note
  also gives the harness's own rank task run raw on the same cases (all
  the rank work one example's properties share: backward over the drawn
  micro-batches, the optimizer step, merge and re-apply checks), and the
  harness's cost over it;
* the start of a rank pool with megatron-core imported (the harness's
  preload and initializer) for 2, 4 and 8 ranks: the first one (fork server
  start and imports included) and then the median of three with the fork
  server up, which is what a pool replacement after a fault costs; target
  under 1.5 s for 4 ranks;
* the time from a planted hang to its report: a raw task that sleeps on
  rank 1 in a warmed pool (the adaptive timeout: 10 s floor, then the
  stacks of every rank), and ``forward_matches`` against
  ``tests.wrong_impls.hangs_on_rank1`` end to end (at most three faulting
  examples, as check_property bounds them).

Figures only; the machine's load changes them (run it on an idle box).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POOL_PRELOAD = ("harness._quiet", "torch", "megatron.core", "harness.tasks")
INITIALIZER = "harness.cpu:rank_initializer"


# ------------------------------------------------------------ rank tasks ---


def floor_forward(ctx, case):
    """Build the case's model at its layout, apply lora.megatron, run forward: nothing else."""
    import torch
    from megatron.core import parallel_state

    import lora.megatron
    from harness.families.gpt.model import build_gpt, causal_mask

    case.layout.initialize_megatron(ctx.world_size, seed=case.seed)  # a no-op after the first call per layout
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if case.family == "moe":
        from harness.families.moe.model import build_moe_gpt, layout_sizes

        model = build_moe_gpt(case.shape, **layout_sizes(case.layout), params_dtype=case.model_dtype).to(case.model_dtype)
    else:
        model = build_gpt(case.shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype)
    torch.manual_seed(case.seed)
    model = lora.megatron.LoRA(**case.lora_kwargs())(model, training=case.training)
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    local_s = s // tp if case.layout.sp else s
    x = torch.randn(local_s, b, h, dtype=case.model_dtype)
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        out = model(ids, pos, causal_mask(s), decoder_input=x)
    return tuple(out.shape)


def noop(ctx):
    return ctx.rank


def sleep_on_rank1(ctx, seconds):
    if ctx.rank == 1:
        time.sleep(seconds)
    return ctx.rank


# ------------------------------------------------------------- measures ---


def per_example(family, layout, examples, seed):
    """(harness s/example, floor s/example, examples) for forward_matches at ``layout``."""
    from hypothesis import settings

    from harness.cases import case_from_json
    from harness.driver import check_property
    from harness.runs import Executor

    run = settings(max_examples=examples, database=None, deadline=None)
    # Warm-up: start the pools this layout needs (and the reference's), import everything.
    check_property("forward_matches", layout, family=family, executor=Executor(),
                   settings=settings(max_examples=1, database=None, deadline=None), seed=seed + 1)
    outcome = check_property("forward_matches", layout, family=family, executor=Executor(), settings=run, seed=seed)
    if not outcome.passed or not outcome.examples:
        raise RuntimeError(f"forward_matches at {family}:{layout.describe()}: {outcome.verdict.value}: {outcome.error}")
    harness_s = outcome.seconds / outcome.examples
    cases = [case_from_json(r.case) for r in outcome.records]
    pool = Executor().pool(layout.min_world_size)  # the same live pool, the same ranks
    pool.run(floor_forward, cases[0])  # warm
    times = []
    for case in cases:
        t0 = time.perf_counter()
        pool.run(floor_forward, case)
        times.append(time.perf_counter() - t0)
    # The harness's own rank task on the same cases, raw: the work every
    # property of an example shares (forward, backward over the drawn
    # micro-batches, the step, the merge and re-apply checks), without
    # hypothesis, the reference run or the comparison.
    from harness.families import get_family

    task = []
    for case in cases:
        t0 = time.perf_counter()
        pool.run(get_family(case.family).task, case)
        task.append(time.perf_counter() - t0)
    return harness_s, statistics.mean(times), len(cases), statistics.mean(task)


def pool_starts(world_sizes):
    """{world: (first start s or None, median warm start s)} with megatron-core preloaded."""
    from harness.pool import RankPool

    out = {}
    first = True
    for ws in world_sizes:
        cold = None
        if first:
            t0 = time.perf_counter()
            RankPool(ws, preload=POOL_PRELOAD, initializer=INITIALIZER).shutdown()
            cold = time.perf_counter() - t0
            first = False
        starts = []
        for _ in range(3):
            pool = RankPool(ws, preload=POOL_PRELOAD, initializer=INITIALIZER)
            starts.append(pool.start_seconds)
            pool.shutdown()
        out[ws] = (cold, statistics.median(starts))
    return out


def hang_to_report():
    """(raw hang report s, its timeout, property-run hang report s, examples run)."""
    from hypothesis import settings

    from harness.driver import check_property
    from harness.layouts import ParallelLayout
    from harness.pool import RankHang, get_pool
    from harness.runs import Executor

    pool = get_pool(2, preload=POOL_PRELOAD, initializer=INITIALIZER)
    pool.run(noop)
    limit = pool.next_timeout
    t0 = time.perf_counter()
    try:
        pool.run(sleep_on_rank1, 3600.0)
    except RankHang:
        pass
    raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = check_property("forward_matches", ParallelLayout(tp=2), "tests.wrong_impls.hangs_on_rank1",
                             executor=Executor(), settings=settings(max_examples=6, database=None, deadline=None), seed=0)
    prop = time.perf_counter() - t0
    return raw, limit, prop, outcome.examples, outcome.verdict.value


def main() -> None:
    from harness import _quiet
    from harness.layouts import ParallelLayout
    from harness.pool import shutdown_all

    _quiet.quiet_parent()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-sizes", default="2,4,8")
    p.add_argument("--skip-hang", action="store_true")
    p.add_argument("--skip-examples", action="store_true")
    args = p.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (figures scale with it)", flush=True)
    rows = []
    try:
        starts = pool_starts([int(w) for w in args.world_sizes.split(",")])
        for ws, (cold, warm) in starts.items():
            if cold is not None:
                rows.append((f"pool start, {ws} ranks, first (fork server + imports)", f"{cold:.2f} s", "", ""))
            target = "target < 1.5 s: " + ("met" if warm < 1.5 else "NOT met") if ws == 4 else ""
            rows.append((f"pool start, {ws} ranks, fork server up (median of 3)", f"{warm:.2f} s", "", target))
            print(rows[-1], flush=True)
        if not args.skip_examples:
            for family, layout in (
                ("gpt", ParallelLayout(tp=2)),
                ("gpt", ParallelLayout(tp=2, ep=2)),
                ("moe", ParallelLayout(tp=2, sp=True)),
                ("moe", ParallelLayout(tp=2, ep=2, sp=True)),
            ):
                h, f, n, t = per_example(family, layout, args.examples, args.seed)
                ratio = h / f
                rows.append((f"forward_matches per example, {family} {layout.describe()} (world {layout.min_world_size}, {n} ex)",
                             f"{h * 1e3:.0f} ms", f"{f * 1e3:.0f} ms", f"{ratio:.1f}x, target <= 3x: {'met' if ratio <= 3 else 'NOT met'}; "
                             f"the harness's rank task alone {t * 1e3:.0f} ms ({h / t:.1f}x)"))
                print(rows[-1], flush=True)
        if not args.skip_hang:
            raw, limit, prop, n, verdict = hang_to_report()
            rows.append(("planted hang (raw task, warmed 2-rank pool) to RankHang", f"{raw:.1f} s", "", f"timeout {limit:.0f} s + stacks"))
            rows.append((f"forward_matches vs hangs_on_rank1 to verdict ({n} ex, {verdict})", f"{prop:.1f} s", "", "3 faulting examples max"))
    finally:
        shutdown_all()
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'what':<{width}}  {'harness':>9}  {'floor':>9}  note")
    for what, value, floor, note in rows:
        print(f"{what:<{width}}  {value:>9}  {floor:>9}  {note}")


if __name__ == "__main__":
    main()
