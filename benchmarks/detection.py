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
failed test report and keeps its verdict and ``found by`` line), and what
found it (a designed, drawn or stored example). Figures only; the targets
(every implementation caught in every run; median at most 15 s, worst at
most 60 s on 2 cores) are printed next to them, never asserted.

    python benchmarks/detection.py [--seeds 10] [--first-seed 1] [--impl dropped_grad_term ...] [--json out.json]
    python benchmarks/detection.py --table run1.json run2.json ...   # the table of runs already made

Each run stops at its first failing verdict: its process group gets SIGTERM
there (``--to-the-end`` lets it finish instead), and a run whose processes
outlive that by 20 s is reported. A caught implementation then costs the
seconds to its first failure, one that is missed a whole downstream run
(minutes). ``--table`` prints the table over the records of several
``--json`` files (seeds run at different times, one implementation's runs
together).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from false_alarms import downstream_file  # noqa: E402  (the README's file, as printed)
from harness.pool import procfs  # noqa: E402  (the run is a session of its own: its members are its processes)

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
import json, os, time


def pytest_runtest_logreport(report):
    # Workers and the controller both see the report: the first to write wins. The verdict and
    # where the failing example came from are read from the failure text (harness.results.failure_text).
    if report.failed:
        text = getattr(report, "longreprtext", "") or ""
        head = next((line for line in text.splitlines() if " at " in line and " for " in line), "")
        found = next((line for line in text.splitlines() if line.startswith("found by ")), "")
        path = os.environ["LORA_FIRST_FAILURE_FILE"]
        part = f"{path}.{os.getpid()}"
        with open(part, "w") as f:
            json.dump({"at": time.time(), "node": report.nodeid, "head": head, "found_by": found}, f)
        try:
            os.link(part, path)  # whole, and only the first
        except FileExistsError:
            pass
        os.unlink(part)
'''

#: The verdicts charged to an implementation, as the first line of a failure says them.
CHARGED = ("numeric", "contract", "crash", "hang")


def pipeline_flags(impl: str) -> list[str]:
    """A pipeline bug exists only at pipeline layouts: its runs add ``--pp 2``. Such a module is named
    ``pp_*`` or says ``PIPELINE_BUG = True``."""
    source = (ROOT / "tests" / "wrong_impls" / f"{impl}.py").read_text()
    return ["--pp", "2"] if impl.startswith("pp_") or re.search(r"^PIPELINE_BUG = True", source, re.M) else []


def run_once(impl: str, seed: int, workers: str, timeout: float, to_the_end: bool = False) -> dict:
    """One run. It stops at the first failing verdict (the pytest process group is terminated
    there: what comes after, the failing cell's report and the other worker finishing its cell,
    is not what the figure measures) unless ``to_the_end``."""
    with tempfile.TemporaryDirectory(prefix="lora-detection-") as tmp:
        test = Path(tmp) / "test_my_lora.py"
        test.write_text(downstream_file())
        (Path(tmp) / "_first_failure.py").write_text(PLUGIN)
        stamp = Path(tmp) / "first_failure.json"
        report = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "_first_failure",
               "-n", workers, "--tp", "2", "--ep", "2", *pipeline_flags(impl), "--lora-impl", f"tests.wrong_impls.{impl}",
               "--lora-seed", str(seed), "--regressions", str(Path(tmp) / "regressions"), "--report", str(report),
               str(test)]
        env = dict(os.environ, LORA_FIRST_FAILURE_FILE=str(stamp),
                   PYTHONPATH=os.pathsep.join([tmp, str(ROOT), os.environ.get("PYTHONPATH", "")]))
        started = time.time()
        rc, out, left = run_until(cmd, tmp, env, timeout, None if to_the_end else stamp)
        seconds = time.time() - started
        first, node, head, found = None, "", "", ""
        if stamp.exists():
            data = json.loads(stamp.read_text())
            first, node, head, found = data["at"] - started, data["node"], data["head"], data["found_by"]
        verdict = head.rpartition(": ")[2].split(" ")[0] if head else ""
        match = re.match(r"found by (?:a )?(\w+)", found)  # designed / drawn / stored
        by = match.group(1) if match else ""
        results = report / "results.json"
        if not by and results.exists():
            by = first_source(json.loads(results.read_text()), node)
        caught = first is not None and verdict in CHARGED
        return {"impl": impl, "seed": seed, "rc": rc, "seconds": seconds, "first_failure_s": first, "cell": node.strip(),
                "caught": caught, "by": by, "verdict": verdict, "left_behind": left,
                "tail": "" if caught else out[-1500:]}


def run_until(cmd: list[str], cwd: str, env: dict, timeout: float, stamp: "Path | None") -> tuple[int, str, int]:
    """Run ``cmd`` in a process group of its own until it exits, ``timeout`` passes, or (``stamp``
    given) that file appears, when the group gets SIGTERM. Returns the exit status (negative: the
    signal), what it printed, and how many processes of its session were still there 20 s later
    (0 expected: the harness's rank processes leave with their owner; any left are then killed)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline and not (stamp is not None and stamp.exists()):
            time.sleep(0.2)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        while (proc.poll() is None or len(procfs.session_members(proc.pid))) and time.monotonic() < end:
            time.sleep(0.2)
        left = len(procfs.session_members(proc.pid))
        if left or proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        log.seek(0)
        return rc, log.read(), left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


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


def impl_line(impl: str, mine: list[dict]) -> str:
    """One implementation's row: caught/runs, median and worst seconds, what found it, the last run's cell."""
    times = [r["first_failure_s"] for r in mine if r["caught"]]
    med = statistics.median(times) if times else float("nan")
    worst = max(times) if times else float("nan")
    by = "/".join(sorted({r["by"] for r in mine if r["caught"] and r["by"]})) or "-"
    return (f"{impl:<34} {sum(r['caught'] for r in mine):>3}/{len(mine):<3} {med:9.1f} {worst:8.1f}  {by:<9} "
            f"{mine[-1]['cell']}")


HEADER = f"{'implementation':<34} {'caught':>7} {'median s':>9} {'worst s':>8}  {'by':<9} first failing cell (last run)"


def totals(runs: list[dict]) -> list[str]:
    caught = [r for r in runs if r["caught"]]
    times = [r["first_failure_s"] for r in caught]
    lines = [f"runs: {len(runs)}, caught: {len(caught)} ({len(caught) / max(len(runs), 1):.0%}; target 100%)"]
    if times:
        lines.append(f"seconds to the first failing verdict: median {statistics.median(times):.1f} "
                     f"(target <= {TARGET_MEDIAN_S:.0f}), worst {max(times):.1f} (target <= {TARGET_WORST_S:.0f}); "
                     f"{sum(t <= TARGET_MEDIAN_S for t in times)} within {TARGET_MEDIAN_S:.0f} s, "
                     f"{sum(t <= TARGET_WORST_S for t in times)} within {TARGET_WORST_S:.0f} s")
        per = {}
        for r in runs:
            per.setdefault(r["impl"], []).append(r)
        medians = [statistics.median([r["first_failure_s"] for r in rs if r["caught"]])
                   for rs in per.values() if any(r["caught"] for r in rs)]
        lines.append(f"per implementation: median of medians {statistics.median(medians):.1f} s, "
                     f"worst median {max(medians):.1f} s; implementations caught in every run: "
                     f"{sum(all(r['caught'] for r in rs) for rs in per.values())} of {len(per)}")
    left = sum(r.get("left_behind", 0) for r in runs)
    lines.append(f"processes that outlived their run by 20 s: {left}")
    return lines


def table(paths: list[str]) -> int:
    """The table over the runs recorded in ``paths`` (``--json`` files)."""
    runs = [r for path in paths for r in json.loads(Path(path).read_text())]
    per: dict[str, list[dict]] = {}
    for r in runs:
        per.setdefault(r["impl"], []).append(r)
    print(HEADER)
    for impl, mine in per.items():
        print(impl_line(impl, sorted(mine, key=lambda r: r["seed"])))
    print()
    print("\n".join(totals(runs)))
    return 0 if all(r["caught"] for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", action="append", default=None, help="a module name under tests/wrong_impls (repeatable)")
    ap.add_argument("--seeds", type=int, default=10, help="runs per implementation (seeds first..first+N-1)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--workers", default="2", help="pytest -n")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write every run's record here")
    ap.add_argument("--to-the-end", action="store_true",
                    help="let each run finish after its first failure (default: stop it there)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the table of runs recorded by --json, run nothing")
    args = ap.parse_args(argv)
    if args.table:
        return table(args.table)
    impls = args.impl or wrong_impls()
    unknown = [i for i in impls if i not in wrong_impls()]
    if unknown:
        ap.error(f"--impl {', '.join(unknown)}: not a wrong implementation under tests/wrong_impls")
    runs: list[dict] = []
    print(HEADER, flush=True)
    for impl in impls:
        mine = []
        for i in range(args.seeds):
            r = run_once(impl, args.first_seed + i, args.workers, args.timeout, args.to_the_end)
            mine.append(r)
            runs.append(r)
            if not r["caught"]:
                print(f"    MISSED {impl} seed {r['seed']} (rc {r['rc']}, {r['seconds']:.0f} s)", flush=True)
            if r["left_behind"]:
                print(f"    {r['left_behind']} processes of {impl} seed {r['seed']} outlived the run by 20 s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
        print(impl_line(impl, mine), flush=True)
    print()
    print("\n".join(totals(runs)))
    return 0 if all(r["caught"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
