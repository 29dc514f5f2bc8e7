"""pytest plugin (entry point ``pytest11``): layouts, the implementation under test, reports.

A downstream test file needs only::

    LORA_IMPL = "mypkg.lora"

    def test_lora(lora_property):
        lora_property.require()

``lora_property`` is parametrized over every registered property at every
layout of ``--tp``/``--ep`` (ids like ``forward_matches-tp2-ep1-etp2-pp1``);
``require()`` runs it (stored regressions first, then hypothesis draws) and
fails the test with the minimal case and a replay command; a cell in which
every example was vacuous (nothing to check) is skipped with that reason,
never passed; a cell whose failing examples also fail with the known-good
control implementation fails as a ``harness`` defect, saying so. A test taking
``layout`` is parametrized over the layouts alone.

Options (all settings are arguments; nothing is read from the environment):

* ``--tp N`` / ``--ep M``: largest tensor / expert parallel sizes;
* ``--lora-impl MODULE``: the implementation under test, overriding a test
  module's ``LORA_IMPL`` (default ``lora.megatron``);
* ``--lora-contract strict|bridge``: judge by this contract instead of what
  the implementation (or the module's ``LORA_CAPABILITIES``) declares;
* ``--rank-timeout SECONDS``: ceiling for one rank task (1 to 86400);
* ``--lora-seed N``: base seed of the draws (0 to 2**32-1; random by
  default, printed in the header; every property at a layout draws the same
  examples, so they share their runs);
* ``--lora-examples N``: drawn examples per property and layout, after the
  designed ones (overrides the hypothesis profile: ``fast`` by default,
  ``deep`` for nightly runs);
* ``--lora-no-designed``: skip the designed examples (``harness.design``):
  a quicker run that no longer exercises every path; for local iteration;
* ``--report DIR``: write ``results.json``, ``report.html``, ``summary.md``
  (merged over pytest-xdist workers);
* ``--regressions DIR``: store failing cases there, replay stored ones first.

Ini option (``[tool.pytest.ini_options]`` or ``pytest.ini``):

* ``lora_regressions = "tests/regressions"``: the project's own regression
  store, relative to the ini file. It is replayed on every run, but written
  only when no ``--lora-impl`` is given on the command line, so a run
  against another implementation never leaves its failing cases in the
  project's store. An explicit ``--regressions DIR`` replaces it and is
  read and written.

Every option is checked in ``pytest_configure``, before any rank process
starts: a bad value (a size beyond ``harness.settings.MAX_WORLD`` ranks, a
rank timeout outside 1 to 86400 s, an implementation that does not load or
declares invalid capabilities, an unknown ``--hypothesis-profile``, a
malformed file in the regression store) is one ``pytest.UsageError``.
"""

from __future__ import annotations

import os
import re
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from harness.exitfirst import FirstRounds
from harness.settings import DEFAULT_PROFILE, PROFILES, layout_set, register_profiles


# At import, before any pytest_configure: hypothesis's own plugin loads
# --hypothesis-profile in its pytest_configure, which may run before ours.
register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora-harness", "LoRA sharding harness")
    group.addoption("--tp", type=int, default=2, help="largest tensor-parallel size to check, a power of two (default 2)")
    group.addoption("--ep", type=int, default=1, help="largest expert-parallel size to check, a power of two (default 1)")
    group.addoption("--pp", type=int, default=1, help="largest pipeline-parallel size to check, a power of two (default 1: no pipeline layouts)")
    group.addoption("--lora-impl", default=None, help="module under test exposing LoRA, VLMLoRA, LoRAMerge (default: the test module's LORA_IMPL, else lora.megatron)")
    group.addoption("--lora-contract", default=None, choices=("strict", "bridge"), help="contract to judge by (default: what the implementation declares)")
    group.addoption("--rank-timeout", type=float, default=None, help="ceiling in seconds for one rank task")
    group.addoption("--lora-examples", type=int, default=None,
                    help="drawn examples per property and layout, after the designed ones (overrides the hypothesis profile)")
    group.addoption("--lora-no-designed", action="store_true", default=False,
                    help="skip the designed examples (every path of the contract at every layout): quicker, for local iteration")
    group.addoption("--lora-seed", type=int, default=None, help="base seed of the draws (default: random, printed in the header)")
    group.addoption("--report", dest="lora_report", default=None, help="write results.json, report.html and summary.md to this directory")
    group.addoption("--regressions", dest="lora_regressions", default=None,
                    help="store failing cases here and replay stored ones first (replaces the lora_regressions ini store)")
    parser.addini(
        "lora_regressions",
        help="the project's own regression store (relative to the ini file): replayed on every run, "
        "written only when no --lora-impl is given",
        default="",
    )


def _usage(message: str) -> None:
    raise pytest.UsageError(f"lora-harness: {message}")


def _check_profile(config: pytest.Config) -> None:
    """An unknown --hypothesis-profile is a usage error (hypothesis's own plugin, which loads it
    after this one's pytest_configure, would end in an INTERNALERROR)."""
    profile = config.getoption("hypothesis_profile", default=None)
    if not profile:
        return
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    try:
        settings.get_profile(profile)
    except InvalidArgument:
        known = sorted(getattr(settings, "_profiles", None) or PROFILES)
        _usage(f"--hypothesis-profile {profile!r} is not a registered hypothesis profile; known: {', '.join(known)}")


def _regression_store(config: pytest.Config) -> Any:
    """``--regressions DIR`` (read and written), else the ``lora_regressions`` ini store
    (written only when no --lora-impl is given), else None; validated either way."""
    from pathlib import Path

    from harness.regressions import RegressionStore

    explicit = config.getoption("lora_regressions")
    if explicit is not None:
        if not explicit.strip():
            _usage(f"--regressions {explicit!r}: give a directory")
        store, flag = RegressionStore(explicit), f"--regressions {explicit}"
    else:
        configured = (config.getini("lora_regressions") or "").strip()
        if not configured:
            return None
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        path = Path(configured)
        store = RegressionStore(path if path.is_absolute() else base / path, writable=config.getoption("lora_impl") is None)
        flag = f"lora_regressions = {configured!r} ({config.inipath or 'ini'})"
    try:
        store.validate()
        store.check_writable()
    except ValueError as exc:
        _usage(f"{flag}: {exc}")
    return store


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    from harness import _quiet
    from harness.settings import check_rank_timeout

    _quiet.quiet_parent()
    register_profiles()
    _check_profile(config)
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile(DEFAULT_PROFILE)
    from harness.plan import Plan, PlanError

    worker = getattr(config, "workerinput", None)
    # A worker draws with the controller's seed, so every worker draws alike; without a seed
    # the plan draws one (printed in the header).
    seed = worker["lora_harness_seed"] if worker is not None and "lora_harness_seed" in worker else config.getoption("lora_seed")
    try:
        # Sizes, examples and seed checked here, before anything else.
        plan = Plan(config.getoption("tp"), config.getoption("ep"), pp=config.getoption("pp"), examples=config.getoption("lora_examples"),
                    seed=seed, designed=not config.getoption("lora_no_designed"))
    except PlanError as exc:
        _usage(str(exc).replace("--examples", "--lora-examples").replace("--seed", "--lora-seed"))
    timeout = config.getoption("rank_timeout")
    if timeout is not None:
        try:
            check_rank_timeout(timeout)
        except ValueError as exc:
            _usage(f"--rank-timeout {exc}")
    impl = config.getoption("lora_impl")
    if impl is not None:
        from harness.contract import ImplLoadError, capabilities_of, load_impl

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            load_impl(impl)
            capabilities_of(impl)
        except ImplLoadError as exc:
            _usage(f"--lora-impl: {exc}")
    report = config.getoption("lora_report")
    if report is not None and not report.strip():
        _usage(f"--report {report!r}: give a directory")
    if report and not hasattr(config, "workerinput"):
        from harness.report.writer import check_writable

        try:
            check_writable(report)
        except (OSError, ValueError) as exc:
            _usage(f"--report {report}: {exc}")
    store = _regression_store(config)
    config.addinivalue_line("markers", "layouts: the test is parametrized over the --tp/--ep layout set")
    if getattr(config.option, "dist", "no") == "load":
        # pytest-xdist's plain -n: distribute by xdist_group instead, so the
        # properties of one layout share their runs in one worker and large
        # worlds are not run side by side on a few cores (an explicit
        # --dist other than "load" is left alone).
        config.option.dist = "loadgroup"
    if worker is not None and worker.get("lora_harness_loadgroup"):
        # A worker parses the original command line (plain -n), so it would
        # not tag its tests with their xdist_group and the controller's
        # loadgroup scheduler would see no groups: tell it here.
        config.option.loadgroup = True
    config._lora_harness = HarnessSession(config, seed=plan.seed, store=store, plan=plan)  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: give each worker the controller's base seed, and its distribution mode."""
    node.workerinput["lora_harness_seed"] = node.config._lora_harness.seed
    node.workerinput["lora_harness_loadgroup"] = getattr(node.config.option, "dist", "no") == "loadgroup"


@dataclass
class HarnessSession:
    """The run's plan (``harness.plan``, from the command line) and every property outcome it produced."""

    config: Any
    seed: int = 0
    outcomes: list = field(default_factory=list)
    _executor: Any = None
    #: The ``harness.regressions.RegressionStore`` failing cases are replayed from (and, unless
    #: it is read-only, stored in); None: no store.
    store: Any = None
    plan: Any = None
    #: Under ``-x``: the collected cells and each scope's first round (``harness.exitfirst``).
    first_rounds: FirstRounds = field(default_factory=FirstRounds)

    def __post_init__(self) -> None:
        if self.plan is None:
            from harness.plan import Plan

            getoption = getattr(self.config, "getoption", lambda name, default=None: default)
            self.plan = Plan(getoption("tp") or 2, getoption("ep") or 1, pp=getoption("pp") or 1, examples=getoption("lora_examples"),
                             seed=self.seed, designed=not getoption("lora_no_designed"))

    @property
    def executor(self) -> Any:
        if self._executor is None:
            from harness.runs import Executor

            self._executor = Executor(timeout=self.config.getoption("rank_timeout"))
        return self._executor

    def settings(self, family: str = "gpt", prop: Any = None) -> Any:
        return self.plan.settings_for(family, prop)

    def impl_for(self, module: Any) -> str:
        return self.config.getoption("lora_impl") or getattr(module, "LORA_IMPL", None) or "lora.megatron"

    def capabilities_for(self, module: Any, impl: str) -> Any:
        from harness.contract import capabilities_of

        caps = capabilities_of(impl, getattr(module, "LORA_CAPABILITIES", None))
        contract = self.config.getoption("lora_contract")
        return caps.with_contract(contract) if contract and contract != caps.contract else caps

    def check(self, prop: str, layout: Any, impl: str, capabilities: Any = None, family: str = "gpt",
              defer: bool = False) -> Any:
        """One cell's ``PropertyOutcome``. Under ``-x`` (``--maxfail 1``) the first cell of a scheduling
        scope first runs that scope's first round (``harness.exitfirst``); with ``defer`` (a test's
        ``require``) a cell before one that failed there ends as skipped, so that failure reports next."""
        from harness.families import get_family
        from harness.plan import Cell
        from harness.properties import get_property
        from harness.results import Verdict

        search = None
        if self.exitfirst:
            search, reason = self.first_rounds.search(self.plan, (family, str(layout), prop), impl, capabilities,
                                                      executor=self.executor, store=self.store)
            if defer and reason:
                search.outcome.verdict, search.outcome.skipped_reason = Verdict.SKIPPED, reason
                return self._keep(search.outcome, capabilities)
        if search is None:
            # check_property resolves the capabilities (capabilities_of(impl, capabilities)).
            cell = Cell(get_family(family), layout, get_property(prop))
            search = self.plan.search(cell, impl, capabilities, executor=self.executor, store=self.store)
        return self._keep(search.finish(), capabilities)

    def _keep(self, outcome: Any, capabilities: Any) -> Any:
        outcome.exception = None  # outcomes travel between xdist processes
        self.outcomes.append((outcome, capabilities))
        return outcome

    def lead_scopes(self, workers: int) -> dict[str, str]:
        """Under ``-x``: each lead layout's scope -> the scope it runs in, dealt out to ``workers``
        (``harness.exitfirst.lead_scopes``); without ``-x`` every layout keeps its own."""
        from harness.exitfirst import lead_scopes

        return lead_scopes(self.plan, workers) if self.exitfirst else {}

    @property
    def exitfirst(self) -> bool:
        """Whether the run stops at its first failure (``-x``, ``--maxfail 1``)."""
        return getattr(getattr(self.config, "option", None), "maxfail", 0) == 1


@dataclass(frozen=True)
class BoundProperty:
    """One registered property at one layout for the implementation under test."""

    session: HarnessSession
    name: str
    layout: Any
    impl: str
    capabilities: Any
    family: str = "gpt"

    def check(self) -> Any:
        """Run it; returns the ``PropertyOutcome`` whatever the verdict."""
        return self.session.check(self.name, self.layout, self.impl, self.capabilities, self.family)

    def require(self) -> Any:
        """Run it; skip if it does not apply here, fail with the minimal case and replay command if it fails."""
        from harness.results import Verdict

        outcome = self.session.check(self.name, self.layout, self.impl, self.capabilities, self.family, defer=True)
        if outcome.verdict is Verdict.SKIPPED:
            pytest.skip(outcome.skipped_reason)
        if outcome.verdict is Verdict.VACUOUS:
            # Nothing was checked: not a pass.
            pytest.skip(f"vacuous: {outcome.error}")
        if not outcome.passed:
            from harness.results import failure_text

            pytest.fail(failure_text(outcome), pytrace=False)
        return outcome


_CELL_ID = re.compile(r"\[(?:([a-z0-9_]+)-)?[a-z0-9_]+-(tp\d+-ep\d+-etp\d+-pp\d+(?:-vpp\d+)?(?:-dp\d+)?(?:-sp)?)\]")


def cell_scope(nodeid: str, lead: Optional[dict[str, str]] = None) -> str:
    """The xdist scope of a test: ``lora-<family>-<layout>`` for a property cell, xdist's own
    group where the id carries one, else the test itself. ``lead`` (under ``-x``:
    ``HarnessSession.lead_scopes``): the scope a lead layout's cells run in instead."""
    match = _CELL_ID.search(nodeid)
    if match:
        scope = f"lora-{match.group(1) or 'gpt'}-{match.group(2)}"
        return (lead or {}).get(scope, scope)
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.split("@")[-1]
    return nodeid


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's ``loadgroup``, grouping the plugin's cells by family and layout from their ids.

    xdist marks a group by renaming the item's node id, which pytest 9 no
    longer reads (``Node.nodeid`` comes from ``_id``): without this every
    property of a layout would run in whichever worker is free, each
    remaking the same runs. Other tests keep xdist's own grouping (when
    their ids carry it) or run one by one.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # Keep the collection order (``cell_order``): xdist would otherwise start
    # the scopes with the most tests first (MoE layouts, ten properties each).
    config.option.loadscopereorder = False

    session: Optional[HarnessSession] = getattr(config, "_lora_harness", None)

    class LayoutScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return cell_scope(nodeid, session.lead_scopes(self.numnodes) if session is not None else None)

    return LayoutScheduling(config, log)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    layouts = layout_set(config.getoption("tp"), config.getoption("ep"), max_pp=config.getoption("pp"))
    if "lora_property" in metafunc.fixturenames:
        from harness.contract import ImplLoadError
        session: HarnessSession = config._lora_harness  # type: ignore[attr-defined]
        impl = session.impl_for(metafunc.module)
        try:
            caps = session.capabilities_for(metafunc.module, impl)
        except (ImplLoadError, TypeError, ValueError) as exc:
            # The module's LORA_IMPL / LORA_CAPABILITIES (the command line's were checked in
            # pytest_configure): one collection error line for this module, no traceback.
            raise pytest.Collector.CollectError(f"lora-harness: {metafunc.module.__name__}: {exc}") from None
        # One xdist group per family and layout: every property of a layout
        # runs in one worker and shares that worker's runs of each example
        # (pytest-xdist's own group suffix is lost under pytest 9, so the
        # plugin's scheduler, ``pytest_xdist_make_scheduler`` below, reads
        # the group from the test id). Layouts run in ``cell_order``: the
        # cheap, sensitive ones first, so a user's ``pytest -x`` stops soon.
        params = [
            pytest.param(
                BoundProperty(session, cell.prop.name, cell.layout, impl, caps, cell.family.name),
                id=cell.test_id,
                marks=pytest.mark.xdist_group(name=cell.group),
            )
            for cell in session.plan.cells()
        ]
        metafunc.parametrize("lora_property", params)
    if "layout" in metafunc.fixturenames:
        metafunc.parametrize("layout", layouts, ids=[l.describe() for l in layouts])


@pytest.fixture(scope="session")
def lora_harness(request: pytest.FixtureRequest) -> HarnessSession:
    """This run's harness session: settings from the command line, outcomes collected for the report."""
    return request.config._lora_harness  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def lora_impl(request: pytest.FixtureRequest) -> str:
    """Name of the implementation under test (``--lora-impl``, else ``lora.megatron``)."""
    return request.config.getoption("lora_impl") or "lora.megatron"


@pytest.fixture(scope="session")
def max_tp(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("tp")


@pytest.fixture(scope="session")
def max_ep(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("ep")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What is checked and what is skipped, before the first test runs."""
    from harness.contract import ImplLoadError, capabilities_of

    name = config.getoption("lora_impl")
    seed = config._lora_harness.seed  # type: ignore[attr-defined]
    lines = [f"lora-harness: {line}" for line in config._lora_harness.plan.header()]  # type: ignore[attr-defined]
    lines[-1] = f"lora-harness: seed {seed} (--lora-seed {seed} draws the same examples again)"
    try:
        caps = capabilities_of(name or "lora.megatron")
    except ImplLoadError:
        return lines
    contract = config.getoption("lora_contract")
    if contract and contract != caps.contract:
        caps = caps.with_contract(contract)
    lines.append(f"lora-harness: impl {name or 'lora.megatron (unless a test module sets LORA_IMPL)'} ({caps.describe()})")
    lines += [f"lora-harness: skipped: {line}" for line in caps.skipped()]
    return lines


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note the property cells this process may run, in order, with their scheduling scope (``-x``'s first round)."""
    harness_session: Optional[HarnessSession] = getattr(session.config, "_lora_harness", None)
    if harness_session is not None:
        bound = [(item.nodeid, getattr(getattr(item, "callspec", None), "params", {}).get("lora_property"))
                 for item in session.items]
        worker = getattr(session.config, "workerinput", None)
        lead = harness_session.lead_scopes(int(worker.get("workercount", 1)) if worker is not None else 1)
        harness_session.first_rounds.note([(cell_scope(n, lead), b) for n, b in bound if isinstance(b, BoundProperty)])


_WORKER_KEY = "lora_harness_outcomes"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker finished; keep the outcomes it sent, for the summary and the report."""
    blob = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
    session: Optional[HarnessSession] = getattr(node.config, "_lora_harness", None)
    if blob and session is not None:
        session.outcomes += pickle.loads(blob)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from harness.pool import shutdown_all

    shutdown_all()
    config = session.config
    harness_session: Optional[HarnessSession] = getattr(config, "_lora_harness", None)
    if harness_session is None:
        return
    if hasattr(config, "workerinput"):
        # A pytest-xdist worker: hand the outcomes to the controller.
        config.workeroutput[_WORKER_KEY] = pickle.dumps(harness_session.outcomes)
        return
    report = config.getoption("lora_report")
    if report and harness_session.outcomes:
        _write_merged_report(config, report, harness_session.outcomes)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """How many examples ran at each layout, over every worker."""
    harness_session: Optional[HarnessSession] = getattr(config, "_lora_harness", None)
    if harness_session is None or not harness_session.outcomes or hasattr(config, "workerinput"):
        return
    from harness.plan import summary_lines

    for line in summary_lines(harness_session.outcomes):
        terminalreporter.write_line(f"lora-harness {line}")


def _write_merged_report(config: Any, report: str, collected: list) -> None:
    from harness.report.writer import write_report

    impls = sorted({o.impl for o, _ in collected})
    caps = next((c for _, c in collected if c is not None), None)
    results = config._lora_harness.plan.results(
        sorted((o for o, _ in collected), key=lambda o: (o.prop, o.layout)),
        impl=", ".join(impls), capabilities=caps, command="pytest " + " ".join(config.invocation_params.args),
    )
    paths = write_report(results, report)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"lora-harness report: {', '.join(str(p) for p in paths.values())}")
