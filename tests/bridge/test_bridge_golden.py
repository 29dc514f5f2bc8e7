"""Megatron-Bridge's own LoRA through the property matrix: every finding known and explained, the checks still fair.

Runs when Megatron-Bridge is installed (``ci/setup.sh`` installs the pinned
version without its GPU dependencies). ``tests/helpers/bridge_golden.json`` is the
table of what the harness finds in it (``tests/helpers/bridge_golden.py`` makes
it): a cell that newly fails, or a known one that vanished, fails the test
with the difference. The README prints the table.
"""

import json

import pytest
from hypothesis import settings

pytest.importorskip("importlib.metadata")
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    BRIDGE_VERSION = version("megatron-bridge")
except PackageNotFoundError:  # pragma: no cover - CI installs it
    BRIDGE_VERSION = None

pytestmark = [
    pytest.mark.skipif(BRIDGE_VERSION is None, reason="Megatron-Bridge is not installed (ci/setup.sh installs it)"),
    pytest.mark.xdist_group(name="megatron-bridge"),
]


@pytest.mark.nightly  # about a minute of Bridge's whole matrix; CI replays each known failing cell below
def test_the_harness_finds_in_megatron_bridge_what_the_golden_table_says(max_tp, max_ep):
    if max_tp < 2 or max_ep < 2:
        pytest.skip("the golden table is for --tp 2 --ep 2")
    from tests.helpers import bridge_golden as golden

    table = json.loads(golden.GOLDEN.read_text())
    assert table["megatron_bridge"] == BRIDGE_VERSION, (
        f"the golden table is for Megatron-Bridge {table['megatron_bridge']}, {BRIDGE_VERSION} is installed: "
        "rerun python -m tests.helpers.bridge_golden --write and review the difference")
    rows = golden.run_matrix()
    want = {golden.key(r) for r in table["cells"]}
    got = {golden.key(r) for r in rows}
    new, vanished = sorted(got - want), sorted(want - got)
    assert not new and not vanished, f"new findings: {new}\nvanished findings: {vanished}"
    for row in rows:
        assert not any(w.startswith("unexplained") for w in row["why"]), row


def test_every_failing_golden_cell_is_bridge_s_and_replays(max_tp, max_ep):
    """Each failing (not advisory) cell's minimal case fails Bridge again and passes lora.megatron (the control)."""
    from harness.cases import case_from_json
    from harness.driver import judge_example
    from harness.properties import get_property
    from harness.results import Verdict
    from harness.runs import Executor
    from tests.helpers import bridge_golden as golden

    if max_tp < 2 or max_ep < 2:
        pytest.skip("the golden cases need --tp 2 --ep 2 (world 4)")
    table = json.loads(golden.GOLDEN.read_text())
    failing = [r for r in table["cells"] if r["verdict"] not in ("advisory",)]
    assert failing, "the table records Bridge's known defects"
    executor = Executor()
    for row in failing:
        case = case_from_json(row["minimal_case"])
        record = judge_example(get_property(row["property"]), case, executor)
        assert record.verdict.value == row["verdict"], (row["property"], row["layout"], record.error)
        assert record.control is not None and record.control.verdict is Verdict.PASS


def test_a_numeric_bug_planted_on_bridge_is_numeric_under_bridge(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    from harness.driver import check_property
    from harness.layouts import ParallelLayout
    from harness.results import Verdict

    outcome = check_property("forward_matches", ParallelLayout(tp=2), "tests.wrong_impls.bridge_row_delta_scaled",
                             settings=settings(max_examples=20, database=None, deadline=None), seed=4, shrink_budget=6, designed=False)
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert outcome.minimal_case.contract == "bridge"
