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
