"""``lora-harness``: run the property checks outside pytest.

    lora-harness verify --tp 2 [--ep 1] [--impl MODULE] [--profile fast|deep] [--examples N]
                        [--property NAME ...] [--layout NAME ...] [--seed N] [--rank-timeout S] [--contract strict|bridge]
                        [--json FILE] [--report DIR] [--regressions DIR]
    lora-harness replay [FILE] [--case-json JSON] --property NAME [--impl MODULE]
    lora-harness report --baseline OLD/results.json NEW/results.json
    lora-harness layouts --tp 2 --ep 2
    lora-harness contract

``verify`` exits 0 when every property holds, 1 when any fails (numeric,
contract, crash or hang), 2 for bad usage (before any rank starts), 3 when
nothing was charged to the implementation but a failing example failed
with the known-good control implementation too (a harness defect), and 130
when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence
from harness.errors import UsageError

__all__ = ["main", "parser", "verify", "UsageError"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _rank_timeout(text: str) -> float:
    """A --rank-timeout: a finite number of seconds from 1 to a day (harness.settings.check_rank_timeout)."""
    from harness.settings import check_rank_timeout

    try:
        return check_rank_timeout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    from harness.settings import SEED_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} must be an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The command line of ``lora-harness`` (also what ``harness.launch`` parses under torchrun)."""
    p = _Parser(prog="lora-harness", description="Prove a sharded LoRA computes what the single-device reference computes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser("verify", help="check every property at every layout of the set")
    v.add_argument("--tp", type=_positive_int, default=2, help="largest tensor-parallel size, a power of two (default 2)")
    v.add_argument("--ep", type=_positive_int, default=1, help="largest expert-parallel size, a power of two (default 1)")
    v.add_argument("--pp", type=_positive_int, default=1, help="largest pipeline-parallel size, a power of two (default 1: no pipeline layouts)")
    v.add_argument("--impl", default="lora.megatron", help="module under test (default lora.megatron)")
    v.add_argument("--profile", default=None, help="hypothesis profile: fast (default) or deep")
    v.add_argument("--examples", type=_positive_int, default=None, help="drawn examples per property and layout, after the designed ones (overrides the profile)")
    v.add_argument("--no-designed", action="store_true", help="skip the designed examples (every path at every layout): quicker, for local iteration")
    v.add_argument("--property", dest="properties", action="append", default=None, help="only this property (repeatable)")
    v.add_argument("--layout", dest="layouts", action="append", default=None, help="only this layout of the set, e.g. tp2-ep1-etp2-pp1 (repeatable)")
    v.add_argument("--family", dest="families", action="append", default=None,
                   help="only this model family: gpt (dense), moe (mixture of experts) or vlm (LLaVA, VLMLoRA freezing) (repeatable; default all)")
    v.add_argument("--seed", type=_seed, default=None, help="hypothesis seed (0 to 2**32-1), for a reproducible run")
    v.add_argument("--rank-timeout", type=_rank_timeout, default=None,
                   help="ceiling in seconds for one rank task (1 to 86400; default 60)")
    v.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="torch.distributed backend of the ranks: gloo (CPU, default) or nccl (one CUDA GPU per rank)")
    v.add_argument("--contract", choices=("strict", "bridge"), default=None, help="judge by this contract (default: what the implementation declares, else strict)")
    v.add_argument("--json", dest="json_path", default=None, help="also write results.json to this file")
    v.add_argument("--report", dest="report_dir", default=None, help="write results.json, report.html and summary.md here")
    v.add_argument("--regressions", dest="regressions_dir", default=None, help="store failing cases here and replay stored ones first")

    r = sub.add_parser("replay", help="rerun one stored or printed case and print its verdict")
    r.add_argument("file", nargs="?", default=None, help="a regression case file written by a failing run")
    r.add_argument("--case-json", default=None, help="the case as JSON (as a failure report prints it)")
    r.add_argument("--property", required=True, help="the property to check")
    r.add_argument("--impl", default=None, help="module under test (default: the case's)")
    r.add_argument("--rank-timeout", type=_rank_timeout, default=None, help="ceiling in seconds for one rank task (1 to 86400; default 60)")

    rep = sub.add_parser("report", help="compare two results.json files")
    rep.add_argument("rest", nargs=argparse.REMAINDER)

    l = sub.add_parser("layouts", help="list the layouts a --tp/--ep set checks")
    l.add_argument("--tp", type=_positive_int, default=2)
    l.add_argument("--ep", type=_positive_int, default=1)
    l.add_argument("--pp", type=_positive_int, default=1)

    sub.add_parser("contract", help="print the contract the harness checks (harness/SPEC.md)")
    return p


# ------------------------------------------------------------------ verify


class _Progress:
    """One updating status line on a terminal; nothing extra otherwise (summary lines suffice)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.failures = 0
        self._width = 0

    def __call__(self, outcome: Any, record: Any) -> None:
        if record is not None and record.verdict.failing:
            self.failures += 1
        if not self.tty:
            return
        line = (
            f"  {outcome.prop} {outcome.layout}: {outcome.examples} examples, "
            f"{sum(r.verdict.failing for r in outcome.records)} failing so far"
        )
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _check_output_file(path: str) -> None:
    """Refuse a --json path that cannot be written, by opening it for writing (permission bits
    say nothing for root, /proc or a read-only mount); a file that did not exist is removed again."""
    if not path.strip():
        raise UsageError(f"--json {path!r}: give a file name")
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"--json {path}: is a directory; give a file name")
    if not parent.is_dir():
        if parent.exists() or any(p.is_file() for p in parent.parents):
            raise UsageError(f"--json {path}: {str(parent)!r} is not a directory")
        raise UsageError(f"--json {path}: directory {str(parent)!r} does not exist")
    existed = target.exists() or target.is_symlink()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot be written ({exc.strerror or exc})") from None
    if not existed:
        try:
            target.unlink()
        except OSError:
            pass


def _check_report_dir(path: str) -> None:
    from harness.report.writer import check_writable

    try:
        check_writable(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--report {path}: {exc}") from None


def verify(args: argparse.Namespace, executor: Any = None, command: Optional[str] = None) -> int:
    """The ``verify`` command: check usage, plan the run (``harness.plan``), run every cell.

    ``args`` as ``parser()`` parses them; ``executor`` (default: a local
    ``harness.runs.Executor``) is where cases run; ``harness.launch``
    passes its torchrun one. Besides the Executor interface the run reads
    three optional attributes of it: ``layout_skip_reason(layout)`` (a
    layout it cannot run: recorded as skipped with that reason),
    ``write_each_cell`` (write the outputs after every property/layout
    cell, so a run killed later leaves a partial report) and
    ``stop_reason`` (set after a fault that leaves it unable to run more:
    the run stops after the current cell).
    """
    from hypothesis import settings

    from harness.contract import ImplLoadError, capabilities_of, load_impl
    from harness.plan import Plan, PlanError
    from harness.settings import DEFAULT_PROFILE, MAX_WORLD, PROFILES, register_profiles

    register_profiles()
    profile = args.profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise UsageError(f"unknown --profile {profile!r}; known: {', '.join(PROFILES)}")
    # A torchrun executor's world may be larger than a local run's bound.
    world = getattr(getattr(executor, "world", None), "world_size", None)
    try:
        plan = Plan(
            args.tp, args.ep, pp=args.pp, families=args.families, properties=args.properties, layouts=args.layouts,
            settings=settings.get_profile(profile), examples=args.examples, seed=args.seed,
            designed=not getattr(args, "no_designed", False),
            max_world=max(MAX_WORLD, world) if isinstance(world, int) else MAX_WORLD,
        )
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    try:
        load_impl(args.impl)
        caps = capabilities_of(args.impl)
    except ImplLoadError as exc:
        raise UsageError(f"--impl: {exc}") from None
    if args.contract and args.contract != caps.contract:
        caps = caps.with_contract(args.contract)
    if args.json_path is not None:
        _check_output_file(args.json_path)
    if args.report_dir is not None:
        if not args.report_dir.strip():
            raise UsageError(f"--report {args.report_dir!r}: give a directory")
        _check_report_dir(args.report_dir)
    store = None
    if args.regressions_dir is not None:
        from harness.regressions import RegressionStore

        if not args.regressions_dir.strip():
            raise UsageError(f"--regressions {args.regressions_dir!r}: give a directory")
        store = RegressionStore(args.regressions_dir)
        try:
            # Input first: every stored file must be a regression file, read before any rank starts.
            store.validate()
            store.check_writable()
        except ValueError as exc:
            raise UsageError(f"--regressions: {exc}") from None

    if getattr(args, "backend", "gloo") == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--backend nccl needs CUDA GPUs (one per rank); none is available here: use --backend gloo")
    return _run(args, plan, caps, store, profile, executor, command)


def _run(args: argparse.Namespace, plan: Any, caps: Any, store: Any, profile: str, executor: Any = None,
         command: Optional[str] = None) -> int:
    """Run the plan's cells, printing one line per cell and each failure; write the outputs."""
    from harness.design import coverage_lines
    from harness.results import PropertyOutcome, Verdict, failure_text
    from harness.pool import shutdown_all
    from harness.runs import Executor

    if executor is None:
        executor = Executor(timeout=args.rank_timeout, backend=getattr(args, "backend", "gloo"))
    skip_reason = getattr(executor, "layout_skip_reason", None)
    if command is None:
        command = "lora-harness " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("lora-harness") else "lora-harness verify"
    results = plan.results([], impl=args.impl, capabilities=caps, command=command)
    print(f"lora-harness verify: impl {args.impl} ({caps.describe()}), profile {profile}")
    header = plan.header()
    for line in header[:-1]:
        print(f"  {line}")
    unrunnable = {}
    if skip_reason is not None:
        for family_layouts in plan.layouts.values():
            for layout in family_layouts:
                why = skip_reason(layout)
                if why and layout not in unrunnable:
                    unrunnable[layout] = why
                    print(f"  skipping layout {layout}: {why}")
    for line in results.skipped:
        print(f"  skipped: {line}")
    print(f"  {header[-1]}")
    progress = _Progress(sys.stdout)
    started = time.monotonic()
    cells = plan.cells()
    try:
        for done, cell in enumerate(cells, 1):
            if cell.layout in unrunnable:
                outcome = PropertyOutcome(prop=cell.prop.name, layout=cell.name, impl=args.impl, family=cell.family.name,
                                          verdict=Verdict.SKIPPED, skipped_reason=unrunnable[cell.layout])
            else:
                outcome = plan.check(cell, args.impl, caps, executor=executor, store=store, progress=progress)
            progress.clear()
            results.outcomes.append(outcome)
            print(outcome.summary_line(), flush=True)
            if not outcome.passed:
                print("    " + failure_text(outcome, head=False).replace("\n", "\n    "))
            if getattr(executor, "write_each_cell", False):
                results.seconds = time.monotonic() - started
                _write_outputs(args, results, quiet=True)
            stop = getattr(executor, "stop_reason", None)
            if stop:
                print(f"stopped after {done} of {len(cells)} property/layout cells: {stop}", flush=True)
                break
    except KeyboardInterrupt:
        progress.clear()
        results.interrupted = True
        shutdown_all()
        done = len(results.outcomes)
        failed = len(results.failed)
        print(f"interrupted: {done} of {len(cells)} property/layout cells finished ({done - failed} passed, {failed} failed)", flush=True)
    finally:
        shutdown_all()
    results.seconds = time.monotonic() - started
    _write_outputs(args, results)
    if results.interrupted:
        return 130
    failed = results.failed
    defects = results.harness_defects
    skipped = sum(o.verdict is Verdict.SKIPPED for o in results.outcomes)
    vacuous = sum(o.verdict is Verdict.VACUOUS for o in results.outcomes)
    tail = f", {skipped} skipped" if skipped else ""
    paths = coverage_lines(results.outcomes, caps)
    if paths:
        print("paths exercised per layout (designed examples first, then drawn; harness.design):")
        for line in paths:
            print("  " + line)
    if vacuous:
        print(f"{vacuous} cell(s) vacuous: every example had nothing to check (not counted as passed)")
    if defects:
        print(f"{len(defects)} cell(s) met a harness defect (the known-good control failed too; exit status 3 "
              "unless the implementation failed something): report it to lora-harness, with the case above")
    print(f"{len(results.outcomes) - len(failed) - len(defects) - skipped - vacuous} passed, {len(failed)} failed{tail}")
    return results.exit_code


def _write_outputs(args: argparse.Namespace, results: Any, quiet: bool = False) -> None:
    """Write --json and --report. A write that fails (the path was checked before the run, but
    disks fill and directories go) costs one line on stderr, and the results go to a fallback
    file in the current directory (or the temporary directory), never lost."""
    from harness.report.writer import results_dict, results_text, write_report

    text: Optional[str] = None
    if args.json_path:
        text = results_text(results_dict(results))
        try:
            with open(args.json_path, "w") as fh:
                fh.write(text)
        except OSError as exc:
            _fall_back(args, text, f"--json {args.json_path}", exc, quiet)
    if args.report_dir:
        try:
            paths = write_report(results, args.report_dir)
        except (OSError, ValueError) as exc:
            if text is None:
                text = results_text(results_dict(results))
            _fall_back(args, text, f"--report {args.report_dir}", exc, quiet)
        else:
            if not quiet:
                print(f"report: {', '.join(str(p) for p in paths.values())}")


def _fall_back(args: argparse.Namespace, text: str, what: str, exc: BaseException, quiet: bool) -> None:
    """Write ``text`` (results.json) to this run's fallback file and say so on stderr (once per
    run while the cells are written one by one, then again at the end)."""
    import tempfile

    why = getattr(exc, "strerror", None) or str(exc)
    path: Optional[Path] = getattr(args, "_fallback_json", None)
    candidates = [path] if path is not None else [
        Path(folder) / f"lora-harness-results-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        for folder in (os.getcwd(), tempfile.gettempdir())
    ]
    for candidate in candidates:
        try:
            candidate.write_text(text)
        except OSError:
            continue
        told = getattr(args, "_fallback_told", set())
        if not quiet or what not in told:
            print(f"lora-harness: {what}: cannot be written ({why}); the results are in {candidate}", file=sys.stderr, flush=True)
        told.add(what)
        args._fallback_json, args._fallback_told = candidate, told
        return
    print(f"lora-harness: {what}: cannot be written ({why}), nor a fallback file in {os.getcwd()} or "
          f"{tempfile.gettempdir()}: the results of this run are lost", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ replay


def _replay_case(args: argparse.Namespace) -> Any:
    """The case ``replay`` reruns, fully checked: one UsageError naming the file (or --case-json),
    the field and the rule for anything that is not a valid case fitting its layout."""
    from collections.abc import Mapping

    from harness.cases import case_from_json
    from harness.regressions import check_regression

    if (args.file is None) == (args.case_json is None):
        raise UsageError("replay: give either a regression FILE or --case-json, not both or neither")
    if args.file is not None:
        where = f"replay {args.file}"
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    else:
        where, text = "--case-json", args.case_json
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    try:
        if args.file is not None and isinstance(data, Mapping) and ("schema" in data or "case" in data):
            # A regression file: its schema, version and fields are checked as a store's are.
            return check_regression(data, where)
        case = case_from_json(data)
        case.validate()
    except ValueError as exc:  # CaseError too
        message = str(exc)
        raise UsageError(message if message.startswith(where) else f"{where}: {message}") from None
    return case


def _replay(args: argparse.Namespace) -> int:
    from harness.contract import ImplLoadError, capabilities_of, load_impl
    from harness.driver import judge_example
    from harness.results import Verdict
    from harness.properties import get_property
    from harness.pool import shutdown_all
    from harness.runs import Executor

    case = _replay_case(args)
    try:
        prop = get_property(args.property)
    except ValueError as exc:
        raise UsageError(f"--property: {exc}") from None
    if args.impl is not None:
        if not args.impl.strip():
            raise UsageError(f"--impl {args.impl!r}: give an importable module name, e.g. mypkg.lora")
        case = case.with_(impl=args.impl)
    try:
        load_impl(case.impl)
        caps = capabilities_of(case.impl)
    except ImplLoadError as exc:
        raise UsageError(f"--impl: {exc}") from None
    skip = prop.skip_reason(case.family, case.layout, caps)
    if skip:
        raise UsageError(f"replay --property {prop.name}: cannot replay this {case.family} case at {case.layout}: {skip}")
    try:
        record = judge_example(prop, case, Executor(timeout=args.rank_timeout), source="replay")
    finally:
        shutdown_all()
    print(f"{record.verdict.value.upper()}  {prop.name} {case.layout} impl {case.impl}  ({record.seconds:.1f}s)")
    if not record.verdict.ok:
        print("    " + (record.error or "").replace("\n", "\n    "))
    for note in record.notes:
        print("    " + note.describe())
    if record.verdict is Verdict.VACUOUS:
        print(f"    vacuous: {record.vacuous}")
    if record.verdict is Verdict.HARNESS:
        return 3
    return 1 if record.verdict.failing else 0


def _contract() -> int:
    path = Path(__file__).with_name("SPEC.md")
    print(path.read_text(), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from harness import _quiet

    _quiet.quiet_parent()
    if argv[:1] == ["report"]:
        # Its own parser (harness.report.baseline): options pass through untouched.
        from harness.report.baseline import main as baseline_main

        return baseline_main(argv[1:])
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return instead of exiting
        return int(exc.code or 0)
    # Like `python -m`: an --impl module in the current directory imports
    # (rank processes adopt this sys.path too).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "layouts":
            from harness.plan import Plan, PlanError

            try:
                layouts = Plan(args.tp, args.ep, pp=args.pp).layouts
            except PlanError as exc:
                raise UsageError(str(exc)) from None
            for family, family_layouts in layouts.items():
                for layout in family_layouts:
                    print(f"{family:<4} {layout}  world {layout.min_world_size}")
            return 0
        if args.command == "replay":
            return _replay(args)
        if args.command == "contract":
            return _contract()
        return verify(args)
    except UsageError as exc:
        print(f"lora-harness: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from harness.pool import shutdown_all

        shutdown_all()
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
