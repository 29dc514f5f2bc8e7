"""``pytest -x`` with the README's file: every cell of a layout takes its first designed example
before any cell finishes (harness.exitfirst), so a bug only a later property sees reports without
waiting for the earlier cells' other examples; without ``-x`` there is no such round.

The wrong implementation here (``merge_ignores_tp``) passes ``forward_matches`` at ``tp2`` and
fails ``merge_matches``, which runs after it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.layouts import ParallelLayout
from tests.frontends.test_downstream import downstream  # noqa: F401  (a fixture: the README file and mypkg.lora)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group(name="lora-world4")

# One layout: forward_matches, then (after cells that share its runs) merge_matches (harness.plan.property_order).
SELECT = "(forward_matches or merge_matches) and tp2-ep1-etp2-pp1] and not moe"


def _pytest(root, *args):
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-v", "test_my_lora.py", "--tp", "2",
           "--lora-seed", "3", "--lora-impl", "tests.wrong_impls.merge_ignores_tp", "-k", SELECT, *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env)


def _verdicts(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"test_lora\[([a-z_]+)-tp2-ep1-etp2-pp1\] (PASSED|FAILED|SKIPPED)", out)}


def test_exitfirst_reports_a_later_cells_failure_first(downstream):  # noqa: F811
    run = _pytest(downstream, "-x")
    out = run.stdout
    assert run.returncode == 1, out[-4000:] + run.stderr[-2000:]
    # forward_matches (first) ends as skipped, with the reason; merge_matches fails with its minimal case.
    assert _verdicts(out) == {"forward_matches": "SKIPPED", "merge_matches": "FAILED"}, out[-4000:]
    assert "not finished: merge_matches at tp2-ep1-etp2-pp1 failed" in out
    assert "merge_matches at tp2-ep1-etp2-pp1 for tests.wrong_impls.merge_ignores_tp" in out
    assert "minimal case: {" in out
    # The failing example was a designed one: it fails at every seed.
    assert re.search(r"found by designed example \d+ of \d+ \(harness.design", out), out[-4000:]


def test_without_exitfirst_there_is_no_round():
    """Without -x a cell runs whole on its own (the suite and test_downstream.py run that way); the
    plugin never asks for a round."""
    from harness.exitfirst import FirstRounds
    from harness.pytest_plugin import HarnessSession

    class Config:
        def __init__(self, maxfail):
            self.option = type("Option", (), {"maxfail": maxfail})()

        def getoption(self, name, default=None):
            return default

    assert HarnessSession(Config(1), seed=1).exitfirst and not HarnessSession(Config(0), seed=1).exitfirst

    class Refuses(FirstRounds):
        def search(self, *a, **k):  # pragma: no cover - the point is that it is never called
            raise AssertionError("a first round without -x")

    session = HarnessSession(Config(0), seed=1, first_rounds=Refuses())
    outcome = session.check("adapters_follow_spec", ParallelLayout(), "lora.megatron", defer=True)
    assert outcome.passed and outcome.examples > 0


class _Config:
    def __init__(self, maxfail, **options):
        self.option = type("Option", (), {"maxfail": maxfail})()
        self._options = options

    def getoption(self, name, default=None):
        return self._options.get(name, default)


def test_under_exitfirst_the_lead_layouts_are_dealt_to_the_workers():
    """Under -x each worker's first scope holds every n-th lead layout (harness.plan.lead_layouts), so
    the first rounds of all of them come before any runs its remaining examples; the other layouts,
    and every layout without -x, keep a scope of their own."""
    from harness.plan import lead_layouts
    from harness.pytest_plugin import HarnessSession, cell_scope

    session = HarnessSession(_Config(1, tp=2, ep=2, pp=2), seed=1)
    pairs = [(f, lay) for f, ls in session.plan.layouts.items() for lay in ls]
    lead = lead_layouts(pairs)
    assert len(lead) == 6 and any(lay.pp > 1 for _, lay in lead)

    def node(family, layout, prop="forward_matches"):
        return f"t.py::test_lora[{'' if family == 'gpt' else family + '-'}{prop}-{layout.describe()}]"

    deal = session.lead_scopes(2)
    assert [cell_scope(node(f, lay), deal) for f, lay in lead] == ["lora-lead-0", "lora-lead-1"] * 3
    assert {cell_scope(node(f, lay, "merge_matches"), session.lead_scopes(1)) for f, lay in lead} == {"lora-lead-0"}
    others = [(f, lay) for f, lay in pairs if (f, lay) not in lead]
    assert others and all(cell_scope(node(f, lay), deal) == f"lora-{f}-{lay.describe()}" for f, lay in others)
    assert HarnessSession(_Config(0, tp=2, ep=2, pp=2), seed=1).lead_scopes(2) == {}


def test_the_first_round_goes_layout_by_layout():
    """A scope with two layouts: the first takes all its cells through their first designed example and
    its shared cells through all of theirs, then the second does; a failure there stops the round."""
    from harness.exitfirst import CollectedCell, first_round

    steps = []

    class Search:
        def __init__(self, family, layout, prop, rows, fails_at=None):
            self.key, self.rows, self.fails_at, self.failing = (family, layout, prop), rows, fails_at, False
            self.prop = type("Prop", (), {"needs": ("impl", "reference") if prop != "training_matches" else ("impl", "loop")})()

        @property
        def designed_left(self):
            return self.rows

        def designed_step(self):
            self.rows -= 1
            steps.append(self.key)
            self.failing = self.key == self.fails_at and True
            return self.failing

    def plan_for(fails_at=None):
        class Plan:
            def search(self, cell, impl, caps, *, executor, store):
                return Search(cell.family.name, str(cell.layout), cell.prop.name, 2, fails_at)
        return Plan()

    a, b = ParallelLayout(tp=2, sp=True), ParallelLayout(tp=1, pp=2, vpp=2)
    cells = [CollectedCell(f, lay, p, "x", None, "lora-lead-0")
             for f, lay in (("gpt", a), ("gpt", b)) for p in ("forward_matches", "training_matches")]
    first_round(plan_for(), cells, "x", None, executor=None, store=None)
    fa, ta, fb, tb = (("gpt", str(lay), p) for lay in (a, b) for p in ("forward_matches", "training_matches"))
    assert steps == [fa, ta, fa, fb, tb, fb]
    steps.clear()
    searches = first_round(plan_for(fails_at=fb), cells, "x", None, executor=None, store=None)
    assert steps == [fa, ta, fa, fb] and searches[fb].failing
