"""The hypothesis driver: replay stored failures, draw examples, run them, shrink, record.

Shared by the pytest plugin and the CLI. ``check_property`` runs one
property at one layout for one implementation and returns a
``PropertyOutcome`` (never raises for a failure of the implementation);
``require_property`` raises instead, for tests. ``run_example`` runs one
case once (the ``lora-harness replay`` command uses it).

Faults are bounded: every hung or crashed example costs a rank timeout or
a pool restart, and the shrinker may try dozens of candidates. After
``max_faults`` faulting examples in one property run, new candidates are
rejected (hypothesis keeps the smallest faulting example found so far) and
a candidate that already faulted is failed again from memory.

Controls: before a failing example is charged to the implementation under
test, the same case runs with a known-good implementation under the same
contract (``control_impl``: ``lora.megatron``; ``lora.reference`` when the
implementation under test is ``lora.megatron`` itself and the layout has
one rank). If the control fails too, the example is the harness's defect
(``Verdict.HARNESS``): hypothesis sees it as passing, so shrinking never
walks into such a region, and it is never stored as a regression. When the
implementation under test is ``lora.megatron`` at a layout of several ranks
there is no independent control: a failure is charged as found.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any, Callable, Optional

from hypothesis import HealthCheck, Phase, given, reject, seed as hypothesis_seed, settings as hsettings

from harness.contract import Capabilities, capabilities_of
from harness.design import designed_rows
from harness.families import get_family
from harness.layouts import ParallelLayout
from harness.properties import Property, get_property
from harness.regressions import RegressionStore
from harness.results import ExampleRecord, PropertyOutcome, Verdict, failure_text
from harness.pool import RankHang, RankPoolFault, RankTaskError
from harness.runs import Evidence, Executor
from harness.strategies import cases_for
from harness.errors import PropertyFailure

__all__ = [
    "PropertyFailure", "CellSearch", "check_property", "require_property", "run_example", "judge_example", "control_impl",
    "default_executor", "replay_command", "CONTROL_IMPL", "SINGLE_RANK_CONTROL_IMPL",
]

#: The known-good implementation a failing example is rerun with.
CONTROL_IMPL = "lora.megatron"
#: The control for ``CONTROL_IMPL`` itself where the layout has one rank.
SINGLE_RANK_CONTROL_IMPL = "lora.reference"

Progress = Callable[[PropertyOutcome, Optional[ExampleRecord]], None]


def default_executor() -> Executor:
    """A fresh executor (default backend and timeout) for callers that do not pass their own.

    No module-level state: pass one ``Executor`` to many ``check_property``
    calls to share its cache of world-size-1 runs between them.
    """
    return Executor()


def _fault_verdict(exc: RankPoolFault) -> Verdict:
    if isinstance(exc, RankHang):
        return Verdict.HANG
    if isinstance(exc, RankTaskError) and exc.errors and all(e.contract for e in exc.errors.values()):
        # Parameter names or shapes not as SPEC lays them out.
        return Verdict.CONTRACT
    return Verdict.CRASH


def run_example(prop: Property, case: Any, executor: Executor, source: str = "drawn") -> ExampleRecord:
    """Run one property on one case; infrastructure faults become a HANG/CRASH record."""
    started = time.monotonic()
    ev = Evidence(executor, case)
    layout = get_family(getattr(case, "family", "gpt")).cell(case.layout)
    try:
        check = prop.check(ev)
    except RankPoolFault as exc:
        output = dict(ev.output)
        output.update({r: t for r, t in (getattr(exc, "output", None) or {}).items() if t})
        return ExampleRecord(prop.name, layout, case.to_json(), _fault_verdict(exc), time.monotonic() - started,
                             error=str(exc), output=output, source=source)
    error = check.message(case) if check.findings else ""
    return ExampleRecord(prop.name, layout, case.to_json(), check.verdict, time.monotonic() - started,
                         check.comparisons, check.findings, error=error, output=dict(ev.output), source=source,
                         notes=list(check.notes), vacuous=check.vacuous)


def control_impl(impl: str, layout: ParallelLayout) -> Optional[str]:
    """The known-good implementation to rerun ``case`` with before charging a failure to ``impl``.

    ``lora.megatron`` for any other implementation; for ``lora.megatron``
    itself, ``lora.reference`` where the case's layout has a single rank,
    else None (no independent implementation runs there).
    """
    if impl != CONTROL_IMPL:
        return CONTROL_IMPL
    if layout.min_world_size == 1:
        return SINGLE_RANK_CONTROL_IMPL
    return None


def judge_example(prop: Property, case: Any, executor: Executor, source: str = "drawn", control: bool = True) -> ExampleRecord:
    """``run_example``, and for a failing example the control run that decides whom it is charged to.

    A failing example whose control (``control_impl``) fails as well comes
    back as ``Verdict.HARNESS``: its findings are kept, its error shows both
    outcomes, ``record.control`` is the control's record, and nothing is
    charged to the implementation. ``control=False`` skips the control.
    """
    record = run_example(prop, case, executor, source=source)
    if not control or not record.verdict.failing:
        return record
    other = control_impl(case.impl, case.layout)
    if other is None or getattr(executor, "stop_reason", None):
        # No independent implementation here, or a world a fault left unable
        # to run anything more (torchrun): charged as found, no control.
        return record
    checked = run_example(prop, case.with_(impl=other), executor, source="control")
    record.control = checked
    if not checked.verdict.failing:
        return record
    record.error = (
        f"HARNESS DEFECT, not charged to {case.impl}: the known-good control {other} fails this example too.\n"
        f"{case.impl} ({record.verdict.value}): {_lead(record)}\n"
        f"{other} ({checked.verdict.value}): {_lead(checked)}"
    )
    record.verdict = Verdict.HARNESS
    return record


def replay_command(prop: str, case: Any, path: Optional[str] = None) -> str:
    """A shell command that reruns exactly this example and prints its verdict."""
    if path is not None:
        return f"lora-harness replay {shlex.quote(str(path))} --property {prop} --impl {shlex.quote(case.impl)}"
    return f"lora-harness replay --property {prop} --case-json {shlex.quote(json.dumps(case.to_json(), sort_keys=True))}"


def _lead(record: ExampleRecord) -> str:
    """The failure's first line: the first quantity that differs, or the fault's headline."""
    failing = [f for f in record.findings if f.verdict.failing]
    if failing:
        return f"[{failing[0].verdict.value}] {failing[0].message}"
    return record.error.splitlines()[0] if record.error else record.verdict.value


#: Examples run while shrinking after the first failure; smaller candidates
#: beyond it are skipped and the smallest failure found so far is reported.
DEFAULT_SHRINK_BUDGET = 20


class CellSearch:
    """One property at one layout for one implementation, as a search that can be run in steps.

    ``check_property`` runs it whole: stored regressions, then the designed
    examples (``harness.design``), then the drawn ones. The steps exist so
    that a run may go through the designed examples of several cells row by
    row (``designed_step``), each cell's first designed example before any
    cell's second, and finish each cell later (``finish``) without running
    anything twice: the examples and their order within a cell, and so the
    cell's outcome, do not depend on how the steps were taken.
    """

    def __init__(
        self,
        prop: str | Property,
        layout: ParallelLayout,
        impl: str = "lora.megatron",
        *,
        settings: Optional[hsettings] = None,
        executor: Optional[Executor] = None,
        capabilities: Optional[Capabilities] = None,
        regressions: Optional[str | RegressionStore] = None,
        seed: Optional[int] = None,
        max_faults: int = 3,
        family: str = "gpt",
        progress: Optional[Progress] = None,
        shrink_budget: int = DEFAULT_SHRINK_BUDGET,
        designed: bool = True,
    ) -> None:
        self.prop = prop if isinstance(prop, Property) else get_property(prop)
        self.layout, self.impl, self.family = layout, impl, family
        self.executor = executor or default_executor()
        self.caps = capabilities_of(impl, capabilities)
        self.store = regressions if isinstance(regressions, RegressionStore) or regressions is None else RegressionStore(regressions)
        self.seed, self.max_faults, self.progress, self.shrink_budget = seed, max_faults, progress, shrink_budget
        self.cell = get_family(family).cell(layout)
        self.outcome = PropertyOutcome(prop=self.prop.name, layout=self.cell, impl=impl, family=family)
        #: True once the cell has its verdict (skipped, failed, or every example ran).
        self.ended = False
        self.seconds = 0.0
        skip = self.prop.skip_reason(family, layout, self.caps)
        if skip is None and layout.sp and not self.caps.sequence_parallel:
            skip = f"{impl} does not declare sequence_parallel support"
        if skip is None:
            missing = get_family(family).requires(self.caps)
            skip = f"{impl} {missing}" if missing else None
        if skip:
            self.outcome.verdict, self.outcome.skipped_reason = Verdict.SKIPPED, skip
            self.ended = True
            return
        self.harness_defects: dict[str, tuple[ExampleRecord, Any]] = {}
        self.outcome.control_impl = control_impl(impl, layout) or ""
        base = settings if settings is not None else hsettings()
        self.run_settings = hsettings(base, deadline=None, suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        self.faulted: dict[str, ExampleRecord] = {}
        self.failed: dict[str, ExampleRecord] = {}
        self.last_failure: dict[str, Any] = {}
        self.passed: set[str] = set()
        self.runs_after_failure = 0
        self.digest = f"{self.prop.name}|{self.cell}|{impl}"
        # Properties that train through the training loop draw one with each example (harness.training).
        self.reads_loop = bool({"training", "training_reference"} & set(self.prop.needs))
        # The checkpoint property draws the layout it loads at (harness.checkpoint).
        self.reads_load = "checkpoint_load" in self.prop.needs
        self.rows: list[dict[str, Any]] = []
        if designed and self.prop.designed:
            only = (self.prop.design_factors or {}).get(family)
            self.rows = designed_rows(family, layout, self.caps, only=only)
        self.next_row = 0
        self._replayed = False

    @property
    def failing(self) -> bool:
        """Whether the cell ended with a verdict charged to the implementation."""
        return self.ended and self.outcome.verdict.failing

    def _timed(self, step: Callable[[], bool]) -> bool:
        started = time.monotonic()
        try:
            return step()
        finally:
            self.seconds += time.monotonic() - started
            self.outcome.seconds = self.seconds

    def _note(self, record: ExampleRecord) -> None:
        self.outcome.records.append(record)
        self.outcome.examples += 1
        if self.progress is not None:
            self.progress(self.outcome, record)

    def _conclude(self, record: ExampleRecord, case: Any, exception: Optional[BaseException]) -> None:
        outcome = self.outcome
        outcome.verdict = record.verdict
        outcome.minimal_case = case
        outcome.error = record.error or _lead(record)
        outcome.exception = exception
        path = None
        if self.store is not None:
            saved = self.store.save(self.prop.name, case, record.verdict.value, _lead(record))
            path = None if saved is None else str(saved)  # a read-only store keeps nothing
            outcome.regression_file = path or ""
        outcome.replay_command = replay_command(self.prop.name, case, path)
        self.ended = True

    def replay_regressions(self) -> bool:
        """1. Stored failures, replayed with this implementation before any draw; True when one fails."""
        if self.ended or self._replayed:
            return self.ended
        self._replayed = True
        return self._timed(self._replay)

    def _replay(self) -> bool:
        if self.store is None:
            return False
        for path, stored in self.store.cases(self.prop.name, self.layout.describe()):
            if stored.family != self.family:
                continue
            case = stored.with_(impl=self.impl, contract=self.caps.contract, layout=self.layout)
            if not _inside(case, self.caps):
                continue
            record = judge_example(self.prop, case, self.executor, source="regression")
            self.outcome.regressions_replayed += 1
            self._note(record)
            if record.verdict is Verdict.HARNESS:
                self.harness_defects.setdefault(repr(case), (record, case))
                continue
            if record.verdict.failing:
                self._conclude(record, case, PropertyFailure(f"stored regression {path} fails: {_lead(record)}"))
                self.outcome.falsifying_example = f"stored regression case {path}"
                self.outcome.found_by = "a stored regression"
                return True
        return False

    def designed_step(self) -> bool:
        """2. The next designed example (after the stored failures); True when the cell has ended.

        Each designed row is a one-example search over a strategy with the
        row's features fixed: hypothesis's first example is the row's
        plainest case (the same for every implementation), and a failure
        shrinks inside the row and is stored like a drawn one.
        """
        if self.replay_regressions() or self.ended:
            return True
        if self.next_row >= len(self.rows):
            return False
        i = self.next_row
        self.next_row += 1
        self.outcome.designed += 1
        one = hsettings(self.run_settings, max_examples=1, database=None, phases=(Phase.generate, Phase.shrink))
        strategy = cases_for(self.family, self.layout, self.impl, self.caps, row=self.rows[i], loop=self.reads_loop,
                             checkpoint=self.reads_load)
        ended = self._timed(lambda: self._search(strategy, one, 0, f"{self.digest}|designed{i}", "designed"))
        if ended and self.outcome.verdict.failing:
            self.outcome.found_by = f"designed example {i + 1} of {len(self.rows)}"
        return ended

    @property
    def designed_left(self) -> int:
        return 0 if self.ended else len(self.rows) - self.next_row

    def finish(self) -> PropertyOutcome:
        """The rest of the cell: its remaining designed examples, then 3. new draws; the outcome."""
        while not self.ended and self.designed_left:
            self.designed_step()
        if self.replay_regressions() or self.ended:
            return self.outcome
        if self.run_settings.max_examples > 0:
            strategy = cases_for(self.family, self.layout, self.impl, self.caps, loop=self.reads_loop, checkpoint=self.reads_load)
            if self._timed(lambda: self._search(strategy, self.run_settings, self.seed, self.digest, "drawn")):
                if self.outcome.verdict.failing:
                    self.outcome.found_by = "a drawn example"
                return self.outcome
        _conclude_without_failure(self.outcome, self.harness_defects)
        self.ended = True
        return self.outcome

    def _search(self, strategy: Any, search_settings: hsettings, search_seed: Optional[int], digest: str, source: str) -> bool:
        """One hypothesis search; True when it ended the cell (a failure, or an error of its own)."""
        self.runs_after_failure = 0
        prop, impl, layout, outcome = self.prop, self.impl, self.layout, self.outcome
        faulted, failed, passed, last_failure = self.faulted, self.failed, self.passed, self.last_failure

        @search_settings
        @given(case=strategy)
        def _property(case: Any) -> None:
            key = repr(case)
            if key in faulted:
                record = faulted[key]
            elif key in failed:
                record = failed[key]
            elif key in passed:
                # Hypothesis may replay a case it saw pass; rejecting it now
                # (the budget is spent) would be an inconsistent result.
                return
            elif len(faulted) >= self.max_faults:
                reject()
            elif failed and self.runs_after_failure >= self.shrink_budget:
                # Shrinking is bounded: the smallest failure found so far stands.
                reject()
            else:
                if failed:
                    self.runs_after_failure += 1
                record = judge_example(prop, case, self.executor, source=source)
                self._note(record)
                if failed and record.control is not None:
                    # The budget is in example runs: a control run counts too.
                    self.runs_after_failure += 1
                if record.verdict is Verdict.HARNESS:
                    # Not the implementation's: hypothesis sees a pass, so it
                    # never shrinks towards such cases.
                    self.harness_defects.setdefault(key, (record, case))
                    passed.add(key)
                elif record.verdict in (Verdict.HANG, Verdict.CRASH):
                    faulted[key] = record
                elif record.verdict.failing:
                    failed[key] = record
                else:
                    passed.add(key)
            if record.verdict.failing:
                last_failure.update(record=record, case=case)
                raise PropertyFailure(
                    f"{prop.name} failed for impl {impl} at layout {layout} ({record.verdict.value}):\n  "
                    + (record.error or _lead(record)).replace("\n", "\n  ")
                )

        # Distinct database keys per property, layout, implementation (and
        # designed row), so a failure recorded for one is replayed only there.
        _property.hypothesis.inner_test._hypothesis_internal_add_digest = digest.encode()
        if search_seed is not None:
            _property = hypothesis_seed(search_seed)(_property)
        try:
            _property()
        except (PropertyFailure, RankPoolFault) as exc:
            # Hypothesis replays the minimal example last: the last failure is the minimal one.
            notes = getattr(exc, "__notes__", [])
            outcome.falsifying_example = "\n".join(n for n in notes if n and "reproduce_failure" not in n)
            if last_failure:
                self._conclude(last_failure["record"], last_failure["case"], exc)
            else:  # pragma: no cover - every failure goes through _property
                outcome.verdict, outcome.error, outcome.exception = Verdict.CRASH, str(exc), exc
                self.ended = True
            return True
        except Exception as exc:  # noqa: BLE001 - a harness or hypothesis error is reported, not hidden
            notes = getattr(exc, "__notes__", [])
            outcome.falsifying_example = "\n".join(n for n in notes if n)
            outcome.verdict, outcome.error, outcome.exception = Verdict.CRASH, f"{type(exc).__name__}: {exc}", exc
            if last_failure:
                outcome.minimal_case = last_failure["case"]
            self.ended = True
            return True
        return False


def check_property(prop: str | Property, layout: ParallelLayout, impl: str = "lora.megatron", **kw: Any) -> PropertyOutcome:
    """Run one property for one layout: stored regressions first, then the designed examples, then hypothesis draws.

    Keywords (``CellSearch``): ``settings`` defaults to the active
    hypothesis profile; ``capabilities`` to what ``impl`` declares
    (``harness.contract.capabilities_of``); ``executor``, ``regressions``
    (a store or its directory), ``seed``, ``max_faults``, ``family``,
    ``progress``, ``shrink_budget``, ``designed``. A failure carries the
    minimal case (``minimal_case``), hypothesis's report
    (``falsifying_example``) and a ``replay_command``; with ``regressions``
    the minimal case is stored there.

    Shrinking is bounded by ``shrink_budget`` example runs after the first
    failure, a failing candidate's control run included (each run costs a
    rank-pool task, and hypothesis would try hundreds); the case reported
    is the smallest failing one found within it.
    """
    return CellSearch(prop, layout, impl, **kw).finish()


def _conclude_without_failure(outcome: PropertyOutcome, harness_defects: dict[str, tuple[ExampleRecord, Any]]) -> None:
    """The verdict of a cell in which nothing was charged to the implementation."""
    if harness_defects:
        record, case = min(harness_defects.values(), key=lambda rc: len(json.dumps(rc[1].to_json(), sort_keys=True)))
        outcome.verdict = Verdict.HARNESS
        outcome.minimal_case = case
        outcome.error = record.error
        outcome.replay_command = replay_command(outcome.prop, case)
        return
    if any(r.verdict is Verdict.ADVISORY for r in outcome.records):
        outcome.verdict = Verdict.ADVISORY
        outcome.error = next(
            f"[advisory] {f.message}" for r in outcome.records for f in r.findings if f.verdict is Verdict.ADVISORY
        )
        return
    if outcome.records and all(r.verdict is Verdict.VACUOUS for r in outcome.records):
        outcome.verdict = Verdict.VACUOUS
        outcome.error = f"every example was vacuous: {outcome.records[0].vacuous}"


def _inside(case: Any, caps: Capabilities) -> bool:
    """Whether a stored case lies inside what the implementation declared."""
    lora = case.lora
    inits = {lora.get("lora_A_init_method", "xavier"), lora.get("lora_B_init_method", "zero")}
    dtype = None if case.lora_dtype is None else str(case.lora_dtype).replace("torch.", "")
    grouped = bool(getattr(getattr(case, "shape", None), "grouped", False))
    return inits <= set(caps.init_methods) and dtype in caps.lora_dtypes and (caps.grouped_experts or not grouped)


def require_property(prop: str | Property, layout: ParallelLayout, impl: str = "lora.megatron", **kw: Any) -> PropertyOutcome:
    """``check_property`` that raises ``PropertyFailure`` (with the minimal case and replay command) on failure."""
    outcome = check_property(prop, layout, impl, **kw)
    if not outcome.passed:
        text = failure_text(outcome)
        if outcome.falsifying_example and outcome.falsifying_example not in text:
            text += "\n" + outcome.falsifying_example
        raise PropertyFailure(text)
    return outcome
