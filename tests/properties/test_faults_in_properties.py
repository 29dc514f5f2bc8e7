"""A crashing or hanging implementation is a reported, bounded failure, never a hung run.

The property run must end, name the rank, carry the stacks of every rank for
a hang, shrink to a minimal example, and leave no rank process behind.
"""

import time

import pytest
from hypothesis import settings

from harness.layouts import ParallelLayout
from harness.driver import check_property
from harness.results import Verdict
from harness.runs import Executor
from harness.pool import get_pool, shutdown_all

TP2 = ParallelLayout(tp=2)
SEARCH = settings(max_examples=40, database=None, deadline=None)


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


def _alive(pid):
    from harness.pool import procfs

    return procfs.is_running(pid)


def test_planted_hang_is_reported_with_all_stacks_and_bounded(capsys):
    # A short rank timeout keeps this test quick; the default policy is in
    # harness.pool.timeouts. The hang budget bounds how many timeouts are paid.
    executor = Executor(timeout=4)
    start = time.monotonic()
    outcome = check_property("forward_matches", TP2, "tests.wrong_impls.hangs_on_rank1", settings=SEARCH, executor=executor, max_faults=2, designed=False)
    elapsed = time.monotonic() - start
    assert outcome.verdict is Verdict.HANG, outcome.error
    report = outcome.error
    assert "RankHang" in report and "Python stacks of rank 0" in report and "Python stacks of rank 1" in report
    assert "wait_forever_in_fc2_adapter" in report
    # The fault budget: at most two hung examples were paid for.
    assert sum(r.verdict is Verdict.HANG for r in outcome.records) <= 2
    # The reported example really reaches linear_fc2's adapter, and replays.
    case = outcome.minimal_case
    assert case is not None and case.layout == TP2
    assert outcome.replay_command.startswith("lora-harness replay")
    with capsys.disabled():
        print(f"\n[planted hang: property run ended after {elapsed:.1f}s, {outcome.examples} examples run]")


def test_planted_crash_names_the_rank_and_exit_code():
    outcome = check_property("forward_matches", TP2, "tests.wrong_impls.crashes_on_rank1", settings=SEARCH, designed=False)
    assert outcome.verdict is Verdict.CRASH, outcome.error
    assert "RankCrash" in outcome.error and "rank 1" in outcome.error and "exited with code 17" in outcome.error
    # Bounded: at most max_faults (3) crashing examples are run, shrinking included.
    assert sum(r.verdict is Verdict.CRASH for r in outcome.records) <= 3


def test_a_rank_that_raises_is_a_crash_naming_rank_and_traceback():
    outcome = check_property("forward_matches", TP2, "tests.wrong_impls.raises_in_forward", settings=SEARCH, designed=False)
    assert outcome.verdict is Verdict.CRASH, outcome.error
    assert "rank 1 raised RuntimeError: custom kernel failed on rank 1" in outcome.error
    assert "Traceback" in outcome.error
    assert sum(r.verdict is Verdict.CRASH for r in outcome.records) <= 3


def test_a_chatty_implementation_does_not_bury_the_verdict(capfd):
    outcome = check_property("forward_matches", TP2, "tests.wrong_impls.chatty", settings=settings(SEARCH, max_examples=2), designed=False)
    assert outcome.passed
    out, err = capfd.readouterr()
    assert "chatty debug line" not in out and "chatty debug line" not in err
    # Each example keeps what its ranks printed.
    assert any("chatty debug line 1999" in r.output.get(1, "") for r in outcome.records)


def test_no_rank_process_survives_faults_and_shutdown():
    pool = get_pool(2, "gloo", initializer="harness.cpu:rank_initializer", preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"))
    pids = list(pool.pids)
    check_property("forward_matches", TP2, "tests.wrong_impls.crashes_on_rank1", settings=settings(SEARCH, max_examples=5), designed=False)
    shutdown_all()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
