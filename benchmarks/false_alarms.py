"""False alarms of the harness on correct implementations: the property matrix over many seeds, every failure counted.

A verdict is a promise: a correct implementation must never fail. This
script runs the README's downstream test file (the one a user copies,
taken from README.md as printed) with pytest at ``--tp 2 --ep 2`` for each
correct implementation, once per seed (``--lora-seed``), each run in a
fresh temporary directory with a fresh regressions store, and prints per
implementation and profile: runs, cells, failing cells (charged to the
implementation), harness defects, vacuous cells, and every failing cell by
name with its seed. Target: 0 failing cells.

    python benchmarks/false_alarms.py [--seeds 20] [--deep-seeds 2] [--impl lora.megatron ...] [--workers 2]

Correct implementations: ``lora.megatron`` (strict contract) and
``tests.impls.declares_bridge`` (lora.megatron under the bridge contract); Megatron-Bridge itself once
it runs out of the box. It takes a while: about three minutes per fast run
on two cores, much longer per deep run. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMPLS = ("lora.megatron", "tests.impls.declares_bridge")


def downstream_file() -> str:
    """The README's downstream test file, exactly as printed."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Verify your own implementation.*?```python\n(.*?)```", text, re.S)
    if not match:
        raise SystemExit("README.md: no python block under 'Verify your own implementation'")
    return match.group(1)


def run_pytest(cmd: list[str], cwd: str, env: dict, timeout: float) -> tuple[int, str]:
    """Run a pytest command line; (exit status, stdout + stderr), or (-1, what it printed) on a timeout."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout} s\n{exc.stdout or ''}"


def run_once(impl: str, seed: int, profile: str, workers: str, timeout: float, select: str | None = None,
             pp: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="lora-false-alarms-") as tmp:
        test = Path(tmp) / "test_my_lora.py"
        test.write_text(downstream_file())
        report = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers, "--tp", "2", "--ep", "2",
               "--pp", str(pp), "--lora-impl", impl, "--lora-seed", str(seed), "--hypothesis-profile", profile,
               "--regressions", str(Path(tmp) / "regressions"), "--report", str(report), str(test)]
        if select:
            cmd += ["-k", select]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        started = time.monotonic()
        rc, out = run_pytest(cmd, tmp, env, timeout)
        seconds = time.monotonic() - started
        cells = []
        results = report / "results.json"
        if results.exists():
            cells = json.loads(results.read_text()).get("cells", [])
    failing = [c for c in cells if c["verdict"] in ("numeric", "contract", "crash", "hang")]
    return {
        "impl": impl, "seed": seed, "profile": profile, "rc": rc, "seconds": seconds, "cells": len(cells),
        "failing": [f"{c['property']} {c['layout']} ({c['verdict']}): {c['error'].splitlines()[0][:200] if c['error'] else ''}"
                    for c in failing],
        "harness": sum(c["verdict"] == "harness" for c in cells),
        "vacuous": sum(c["verdict"] == "vacuous" for c in cells),
        "tail": out[-2000:] if rc not in (0,) else "",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", action="append", default=None, help="a correct implementation (repeatable)")
    ap.add_argument("--seeds", type=int, default=20, help="fast-profile runs per implementation (seeds 1..N)")
    ap.add_argument("--deep-seeds", type=int, default=2, help="deep-profile runs per implementation")
    ap.add_argument("--first-seed", type=int, default=1, help="the first fast-profile seed")
    ap.add_argument("--select", default=None, help="only the cells this pytest -k expression selects (e.g. a property added since the last full sweep)")
    ap.add_argument("--deep-first-seed", type=int, default=1000, help="the first deep-profile seed")
    ap.add_argument("--workers", default="2", help="pytest -n")
    ap.add_argument("--pp", type=int, default=1, help="pytest --pp: 2 adds the pipeline layouts")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write every run's record here")
    args = ap.parse_args(argv)
    impls = args.impl or list(DEFAULT_IMPLS)
    runs = []
    plan = [(impl, args.first_seed + i, "fast") for impl in impls for i in range(args.seeds)]
    plan += [(impl, args.deep_first_seed + i, "deep") for impl in impls for i in range(args.deep_seeds)]
    for impl, seed, profile in plan:
        r = run_once(impl, seed, profile, args.workers, args.timeout, args.select, args.pp)
        runs.append(r)
        status = "ok" if not r["failing"] and r["rc"] in (0,) else f"rc {r['rc']}"
        print(f"{impl:<28} {profile:<4} seed {seed:<5} {r['cells']:>3} cells  {len(r['failing'])} failing  "
              f"{r['harness']} harness  {r['vacuous']} vacuous  {r['seconds']:6.0f} s  {status}", flush=True)
        for line in r["failing"]:
            print(f"    FAIL {line}", flush=True)
        if r["tail"] and not r["failing"]:
            print("    " + r["tail"].replace("\n", "\n    "), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=1))
    print()
    print("implementation               profile  runs  cells  failing cells  harness  vacuous")
    total_failing = 0
    for impl in impls:
        for profile in ("fast", "deep"):
            mine = [r for r in runs if r["impl"] == impl and r["profile"] == profile]
            if not mine:
                continue
            failing = sum(len(r["failing"]) for r in mine) + sum(1 for r in mine if r["rc"] not in (0,) and not r["failing"])
            total_failing += failing
            print(f"{impl:<28} {profile:<7} {len(mine):>5} {sum(r['cells'] for r in mine):>6} {failing:>14} "
                  f"{sum(r['harness'] for r in mine):>8} {sum(r['vacuous'] for r in mine):>8}")
    print(f"failures charged to correct implementations: {total_failing} (target 0)")
    return 1 if total_failing else 0


if __name__ == "__main__":
    sys.exit(main())
