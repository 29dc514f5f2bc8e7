"""Detection rate: does the fast profile catch every wrong implementation in every run, and how soon?

For each deliberately wrong implementation in ``tests/wrong_impls/`` (every
module whose docstring starts "Bug"), over several seeds, this script runs
the README's downstream test file (taken from README.md as printed) the way
a user's CI does:

    pytest -x -n 2 --tp 2 --ep 2 --lora-impl tests.wrong_impls.<name> --lora-seed <seed> test_my_lora.py

each in a fresh temporary directory with a fresh regressions store, and
prints per implementation: the fraction of runs that caught it (a failing
verdict charged to it: numeric, contract, crash or hang), and the median and
worst seconds from the start of the run to its first failing verdict (taken
by a small pytest plugin, ``_first_failure``, that timestamps the first
failed test report the controller receives). Figures only; the targets
(every implementation caught in every run; median at most 15 s, worst at
most 60 s on 2 cores) are printed next to them, never asserted.

    python benchmarks/detection.py [--seeds 10] [--impl dropped_grad_term ...] [--json out.json]

It takes a while: a caught implementation costs the seconds to its first
failure plus pytest's start (a few seconds), one that is missed a whole
downstream run (minutes).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from false_alarms import downstream_file, run_pytest  # noqa: E402  (the README's file, as printed)

TARGET_MEDIAN_S = 15.0
TARGET_WORST_S = 60.0


def wrong_impls() -> list[str]:
    """Every module of tests/wrong_impls whose docstring starts with "Bug"."""
    out = []
    for path in sorted((ROOT / "tests" / "wrong_impls").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if doc.startswith("Bug"):
            out.append(path.stem)
    return out


PLUGIN = '''
import os, time


def pytest_runtest_logreport(report):
    # Workers and the controller both see the report: the first to write wins.
    if report.failed:
        try:
            with open(os.environ["LORA_FIRST_FAILURE_FILE"], "x") as f:
                f.write(f"{time.time()} {report.nodeid}")
        except FileExistsError:
            pass
'''


def pipeline_flags(impl: str) -> list[str]:
    """A pipeline bug exists only at pipeline layouts: its runs add ``--pp 2``. Such a module is named
    ``pp_*`` or says ``PIPELINE_BUG = True``."""
    source = (ROOT / "tests" / "wrong_impls" / f"{impl}.py").read_text()
    return ["--pp", "2"] if impl.startswith("pp_") or re.search(r"^PIPELINE_BUG = True", source, re.M) else []


def run_once(impl: str, seed: int, workers: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lora-detection-") as tmp:
        test = Path(tmp) / "test_my_lora.py"
        test.write_text(downstream_file())
        (Path(tmp) / "_first_failure.py").write_text(PLUGIN)
        stamp = Path(tmp) / "first_failure.txt"
        report = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "_first_failure",
               "-n", workers, "--tp", "2", "--ep", "2", *pipeline_flags(impl), "--lora-impl", f"tests.wrong_impls.{impl}",
               "--lora-seed", str(seed), "--regressions", str(Path(tmp) / "regressions"), "--report", str(report),
               str(test)]
        env = dict(os.environ, LORA_FIRST_FAILURE_FILE=str(stamp),
                   PYTHONPATH=os.pathsep.join([tmp, str(ROOT), os.environ.get("PYTHONPATH", "")]))
        started = time.time()
        rc, out = run_pytest(cmd, tmp, env, timeout)
        seconds = time.time() - started
        first, node = None, ""
        if stamp.exists():
            at, _, node = stamp.read_text().partition(" ")
            first = float(at) - started
        verdicts, source = [], ""
        results = report / "results.json"
        if results.exists():
            data = json.loads(results.read_text())
            verdicts = [c["verdict"] for c in data.get("cells", [])
                        if c["verdict"] in ("numeric", "contract", "crash", "hang")]
            source = first_source(data, node)
        harness = "harness defect" in out.lower() or " hbug " in out.lower()
        # pytest exits 1 when a test failed; under -x with xdist it may report the stop as
        # an interruption (2). Either way the first failed report is the verdict.
        caught = rc in (1, 2) and first is not None and not harness
        return {"impl": impl, "seed": seed, "rc": rc, "seconds": seconds, "first_failure_s": first, "cell": node.strip(),
                "caught": caught, "by": source, "verdicts": verdicts, "tail": "" if caught else out[-1500:]}


def first_source(results: dict, node: str) -> str:
    """Where the first failing example of the failing cell ``node`` came from (``designed``, ``drawn``,
    ``stored``), from the report's examples; "" if unknown. A designed example exists at every seed
    (its drawn remainder, sizes and values, does not), a drawn one only at this seed."""
    m = re.search(r"\[(?:(moe|vlm)-)?([a-z_]+)-(.*)\]", node)
    if not m:
        return ""
    family, prop, layout = m.group(1) or "gpt", m.group(2), m.group(3)
    for ex in results.get("examples", []):
        lay = ex.get("layout", "")
        if ex.get("property") == prop and lay.split(":")[-1] == layout and lay.startswith(f"{family}:") == (family != "gpt") \
                and ex.get("verdict") in ("numeric", "contract", "crash", "hang"):
            return ex.get("source", "")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", action="append", default=None, help="a module name under tests/wrong_impls (repeatable)")
    ap.add_argument("--seeds", type=int, default=10, help="runs per implementation (seeds first..first+N-1)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--workers", default="2", help="pytest -n")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write every run's record here")
    args = ap.parse_args(argv)
    impls = args.impl or wrong_impls()
    runs: list[dict] = []
    print(f"{'implementation':<34} {'caught':>7} {'median s':>9} {'worst s':>8}  {'by':<9} first failing cell (last run)",
          flush=True)
    for impl in impls:
        mine = []
        for i in range(args.seeds):
            r = run_once(impl, args.first_seed + i, args.workers, args.timeout)
            mine.append(r)
            runs.append(r)
            if not r["caught"]:
                print(f"    MISSED {impl} seed {r['seed']} (rc {r['rc']}, {r['seconds']:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
        times = [r["first_failure_s"] for r in mine if r["caught"]]
        med = statistics.median(times) if times else float("nan")
        worst = max(times) if times else float("nan")
        by = "/".join(sorted({r["by"] for r in mine if r["caught"] and r["by"]})) or "-"
        print(f"{impl:<34} {sum(r['caught'] for r in mine):>3}/{len(mine):<3} {med:9.1f} {worst:8.1f}  {by:<9} "
              f"{mine[-1]['cell']}", flush=True)
    caught = [r for r in runs if r["caught"]]
    times = [r["first_failure_s"] for r in caught]
    print()
    print(f"runs: {len(runs)}, caught: {len(caught)} ({len(caught) / max(len(runs), 1):.0%}; target 100%)")
    if times:
        print(f"seconds to the first failing verdict: median {statistics.median(times):.1f} (target <= {TARGET_MEDIAN_S:.0f}), "
              f"worst {max(times):.1f} (target <= {TARGET_WORST_S:.0f})")
    return 0 if len(caught) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
