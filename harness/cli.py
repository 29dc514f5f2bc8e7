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
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main"]


class UsageError(Exception):
    """Bad usage: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-harness", description="Prove a sharded LoRA computes what the single-device reference computes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser("verify", help="check every property at every layout of the set")
    v.add_argument("--tp", type=_positive_int, default=2, help="largest tensor-parallel size, a power of two (default 2)")
    v.add_argument("--ep", type=_positive_int, default=1, help="largest expert-parallel size, a power of two (default 1)")
    v.add_argument("--impl", default="lora.megatron", help="module under test (default lora.megatron)")
    v.add_argument("--profile", default=None, help="hypothesis profile: fast (default) or deep")
    v.add_argument("--examples", type=_positive_int, default=None, help="examples per property and layout (overrides the profile)")
    v.add_argument("--property", dest="properties", action="append", default=None, help="only this property (repeatable)")
    v.add_argument("--layout", dest="layouts", action="append", default=None, help="only this layout of the set, e.g. tp2-ep1-etp2-pp1 (repeatable)")
    v.add_argument("--family", dest="families", action="append", default=None,
                   help="only this model family: gpt (dense), moe (mixture of experts) or vlm (LLaVA, VLMLoRA freezing) (repeatable; default all)")
    v.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a reproducible run")
    v.add_argument("--rank-timeout", type=_positive_float, default=None, help="ceiling in seconds for one rank task")
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
    r.add_argument("--rank-timeout", type=_positive_float, default=None)

    rep = sub.add_parser("report", help="compare two results.json files")
    rep.add_argument("rest", nargs=argparse.REMAINDER)

    l = sub.add_parser("layouts", help="list the layouts a --tp/--ep set checks")
    l.add_argument("--tp", type=_positive_int, default=2)
    l.add_argument("--ep", type=_positive_int, default=1)

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
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"--json {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"--json {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--json {path}: not writable")


def _check_report_dir(path: str) -> None:
    from harness.report.writer import check_writable

    try:
        check_writable(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--report {path}: {exc}") from None


def _verify(args: argparse.Namespace, executor: Any = None, command: Optional[str] = None) -> int:
    """The ``verify`` command: check usage, then run every property at every layout.

    ``executor`` (default: a local ``harness.runs.Executor``) is where cases
    run; ``harness.launch`` passes its torchrun one. Besides the Executor
    interface the run reads three optional attributes of it:
    ``layout_skip_reason(layout)`` (a layout it cannot run: recorded as
    skipped with that reason), ``write_each_cell`` (write the outputs after
    every property/layout cell, so a run killed later leaves a partial
    report) and ``stop_reason`` (set after a fault that leaves it unable to
    run more: the run stops after the current cell).
    """
    from hypothesis import settings

    from harness.contract import ImplLoadError, capabilities_of, load_impl
    from harness.settings import DEFAULT_PROFILE, PROFILES, layout_set, register_profiles

    register_profiles()
    profile = args.profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise UsageError(f"unknown --profile {profile!r}; known: {', '.join(PROFILES)}")
    from harness.properties import registry

    props = registry()
    names = args.properties or list(props)
    unknown = [p for p in names if p not in props]
    if unknown:
        raise UsageError(f"unknown --property {', '.join(unknown)}; known: {', '.join(props)}")
    from harness.settings import FAMILIES

    families = list(dict.fromkeys(args.families or FAMILIES))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UsageError(f"unknown --family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    try:
        layouts = {family: layout_set(args.tp, args.ep, family) for family in families}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.layouts:
        known = {str(layout) for family_layouts in layouts.values() for layout in family_layouts}
        unknown = [name for name in args.layouts if name not in known]
        if unknown:
            raise UsageError(f"--layout {', '.join(unknown)} is not in the set of --tp {args.tp} --ep {args.ep}: {', '.join(sorted(known))}")
        layouts = {f: [l for l in ls if str(l) in args.layouts] for f, ls in layouts.items()}
    try:
        load_impl(args.impl)
        caps = capabilities_of(args.impl)
    except ImplLoadError as exc:
        raise UsageError(f"--impl: {exc}") from None
    if args.contract and args.contract != caps.contract:
        caps = caps.with_contract(args.contract)
    if args.json_path:
        _check_output_file(args.json_path)
    if args.report_dir:
        _check_report_dir(args.report_dir)
    store = None
    if args.regressions_dir:
        from harness.regressions import RegressionStore

        store = RegressionStore(args.regressions_dir)
        try:
            store.check_writable()
        except ValueError as exc:
            raise UsageError(f"--regressions: {exc}") from None

    if getattr(args, "backend", "gloo") == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--backend nccl needs CUDA GPUs (one per rank); none is available here: use --backend gloo")
    run_settings = settings.get_profile(profile)
    if args.examples is not None:
        run_settings = settings(run_settings, max_examples=args.examples)
    return _run_verify(args, props, names, layouts, caps, run_settings, store, profile, executor, command)


def _run_verify(args, props, names, layouts, caps, run_settings, store, profile, executor=None, command=None) -> int:
    from hypothesis import settings

    from harness.driver import check_property
    from harness.report.environment import collect_environment
    from harness.results import PropertyOutcome, RunResults, Verdict
    from harness.runner import shutdown_all
    from harness.runs import Executor

    if executor is None:
        executor = Executor(timeout=args.rank_timeout, backend=getattr(args, "backend", "gloo"))
    skip_reason = getattr(executor, "layout_skip_reason", None)
    if command is None:
        command = "lora-harness " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("lora-harness") else "lora-harness verify"
    results = RunResults(
        impl=args.impl,
        capabilities=caps.to_dict(),
        environment=collect_environment(args.impl),
        skipped=caps.skipped(),
        command=command,
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print(f"lora-harness verify: impl {args.impl} ({caps.describe()}), profile {profile}")
    for family, family_layouts in layouts.items():
        print(f"  {family} layouts: {', '.join(map(str, family_layouts))}")
    unrunnable = {}
    if skip_reason is not None:
        for family_layouts in layouts.values():
            for layout in family_layouts:
                why = skip_reason(layout)
                if why and layout not in unrunnable:
                    unrunnable[layout] = why
                    print(f"  skipping layout {layout}: {why}")
    for line in results.skipped:
        print(f"  skipped: {line}")
    import random

    from harness.driver import layout_seed

    base_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"  seed {base_seed} (--seed {base_seed} draws the same examples again)")
    progress = _Progress(sys.stdout)
    started = time.monotonic()
    cells = [
        (family, layout, name)
        for family, family_layouts in layouts.items()
        for layout in family_layouts
        for name in names
        if family in props[name].families
    ]
    from harness.settings import FAMILY_EXAMPLE_SHARE

    def family_settings(family: str) -> Any:
        if args.examples is not None:
            return run_settings
        return settings(run_settings, max_examples=max(2, math.ceil(run_settings.max_examples * FAMILY_EXAMPLE_SHARE[family])))

    try:
        for done, (family, layout, name) in enumerate(cells, 1):
            if layout in unrunnable:
                cell = layout.describe() if family == "gpt" else f"{family}:{layout.describe()}"
                outcome = PropertyOutcome(prop=name, layout=cell, impl=args.impl, family=family,
                                          verdict=Verdict.SKIPPED, skipped_reason=unrunnable[layout])
            else:
                outcome = check_property(
                    props[name], layout, args.impl, settings=family_settings(family), executor=executor,
                    capabilities=caps, regressions=store, seed=layout_seed(base_seed, layout, family), progress=progress,
                    family=family,
                )
            progress.clear()
            results.outcomes.append(outcome)
            print(outcome.summary_line(), flush=True)
            if not outcome.passed:
                _print_failure(outcome)
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
    if vacuous:
        print(f"{vacuous} cell(s) vacuous: every example had nothing to check (not counted as passed)")
    if defects:
        print(f"{len(defects)} cell(s) met a harness defect (the known-good control failed too; exit status 3 "
              "unless the implementation failed something): report it to lora-harness, with the case above")
    print(f"{len(results.outcomes) - len(failed) - len(defects) - skipped - vacuous} passed, {len(failed)} failed{tail}")
    return results.exit_code


def _print_failure(outcome: Any) -> None:
    if outcome.records and outcome.records[-1].source == "regression":
        print(f"    {outcome.falsifying_example} (replayed before any new draw)")
    print("    " + outcome.error.replace("\n", "\n    "))
    if outcome.minimal_case is not None:
        print("    minimal case: " + json.dumps(outcome.minimal_case.to_json(), sort_keys=True))
    if outcome.replay_command:
        print("    replay: " + outcome.replay_command)


def _write_outputs(args: argparse.Namespace, results: Any, quiet: bool = False) -> None:
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results.to_json(), fh, indent=2, allow_nan=False)
    if args.report_dir:
        from harness.report.writer import write_report

        paths = write_report(results, args.report_dir)
        if not quiet:
            print(f"report: {', '.join(str(p) for p in paths.values())}")


# ------------------------------------------------------------------ replay


def _replay(args: argparse.Namespace) -> int:
    from harness.cases import case_from_json
    from harness.contract import ImplLoadError, load_impl
    from harness.driver import judge_example
    from harness.results import Verdict
    from harness.properties import get_property
    from harness.runner import shutdown_all
    from harness.runs import Executor

    if (args.file is None) == (args.case_json is None):
        raise UsageError("replay: give either a regression FILE or --case-json, not both or neither")
    try:
        if args.file is not None:
            data = json.loads(Path(args.file).read_text())
            data = data.get("case", data)
        else:
            data = json.loads(args.case_json)
        case = case_from_json(data)
        prop = get_property(args.property)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"replay: {exc}") from None
    if args.impl:
        case = case.with_(impl=args.impl)
    try:
        load_impl(case.impl)
    except ImplLoadError as exc:
        raise UsageError(f"--impl: {exc}") from None
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
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return instead of exiting
        return int(exc.code or 0)
    # Like `python -m`: an --impl module in the current directory imports
    # (rank processes adopt this sys.path too).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "layouts":
            from harness.settings import FAMILIES, layout_set

            try:
                layouts = {family: layout_set(args.tp, args.ep, family) for family in FAMILIES}
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            for family, family_layouts in layouts.items():
                for layout in family_layouts:
                    print(f"{family:<4} {layout}  world {layout.min_world_size}")
            return 0
        if args.command == "replay":
            return _replay(args)
        if args.command == "contract":
            return _contract()
        return _verify(args)
    except UsageError as exc:
        print(f"lora-harness: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from harness.runner import shutdown_all

        shutdown_all()
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
