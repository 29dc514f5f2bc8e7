"""Tests of the rank pool (harness.pool): results, reuse, fault reports, and no leftover processes."""

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness.pool import procfs
from tests.helpers.processes import default_sigint
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.pool
import harness.runner
from harness.pool import forkserver, lifecycle, timeouts
from harness.pool import (
    RankContext,
    RankCrash,
    RankHang,
    RankPool,
    RankPoolFault,
    RankTaskError,
    get_pool,
    shutdown_all,
)
from tests.helpers import runner_tasks as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One configuration for every get_pool call in this file, so the cached pool
# is shared between tests instead of being replaced for a config change.
KW = {"timeout": 30}


def _running(pid: int) -> bool:
    """Is ``pid`` a live (non-zombie) process? Zombies of an exited process count as gone."""
    return procfs.is_running(pid)


def _still_running(pids, within: float = 5.0) -> list:
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def _cleanup_pools():
    yield
    shutdown_all()


# ------------------------------------------------------------- results ----


def test_every_rank_runs_the_task_and_results_come_in_rank_order():
    pool = get_pool(2, **KW)
    infos = pool.run(T.rank_info)
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["dist_rank"] for i in infos] == [0, 1]
    assert {i["dist_world_size"] for i in infos} == {2}
    assert {i["backend"] for i in infos} == {"gloo"}
    assert [i["pid"] for i in infos] == pool.pids
    assert {i["threads"] for i in infos} == {1}
    # forkserver children: the owner is not their parent, hence the watchdog
    assert all(i["ppid"] != os.getpid() for i in infos)
    # all_reduce of the rank numbers is their sum on every rank
    assert pool.run(T.all_reduce_ranks) == [1.0, 1.0]


def test_args_kwargs_and_tensors_travel_both_ways():
    pool = get_pool(2, **KW)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = pool.run(T.scaled_by_rank, t, offset=0.5)
    assert len(out) == 2
    torch.testing.assert_close(out[0], t * 1 + 0.5)
    torch.testing.assert_close(out[1], t * 2 + 0.5)


def test_pool_is_reused_across_tasks_and_rank_state_persists():
    pool = get_pool(2, **KW)
    pids = pool.pids
    first = pool.run(T.count_calls)
    second = get_pool(2, **KW).run(T.count_calls)
    assert get_pool(2, **KW) is pool and pool.pids == pids
    assert second == [first[0] + 1, first[1] + 1]


def test_hypothesis_examples_all_run_on_one_pool():
    seen_pids = set()

    @settings(max_examples=30, deadline=None, database=None)
    @given(st.integers(-(10**6), 10**6))
    def check(x):
        pool = get_pool(2, **KW)
        assert pool.run(T.sum_of_rank_multiples, x) == [3 * x, 3 * x]
        seen_pids.add(tuple(pool.pids))

    check()
    assert len(seen_pids) == 1


def test_pools_of_different_world_sizes_coexist():
    p2 = get_pool(2, **KW)
    p1 = get_pool(1, **KW)
    p3 = get_pool(3, **KW)
    assert p3.run(T.all_reduce_ranks) == [3.0] * 3
    assert p1.run(T.all_reduce_ranks) == [0.0]
    assert p2.run(T.all_reduce_ranks) == [1.0, 1.0]
    assert len({*p1.pids, *p2.pids, *p3.pids}) == 6
    assert p1.alive and p2.alive and p3.alive
    p1.shutdown()
    p3.shutdown()
    assert _still_running(p1.pids + p3.pids) == []
    assert p2.alive


def test_initializer_sys_path_and_environment(tmp_path, monkeypatch):
    (tmp_path / "runner_probe_before.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LORA_HARNESS_TEST_MARK", "set-before-start")
    pool = RankPool(2, initializer="tests.helpers.runner_tasks:mark_initialized", timeout=30)
    try:
        envs = pool.run(T.environment, "LORA_HARNESS_TEST_MARK")
        assert [e["initialized"] for e in envs] == [(0, 2.0), (1, 2.0)]
        assert all(e["sys_path"] == sys.path for e in envs)
        assert {e["env"] for e in envs} == {"set-before-start"}
        assert {e["threads"] for e in envs} == {1}
        assert pool.run(T.import_module, "runner_probe_before") == [42, 42]

        # sys.path is sent at start: a path added later is not seen by the ranks.
        later = tmp_path / "later"
        later.mkdir()
        (later / "runner_probe_after.py").write_text("VALUE = 7\n")
        monkeypatch.syspath_prepend(str(later))
        with pytest.raises(RankTaskError) as info:
            pool.run(T.import_module, "runner_probe_after")
        assert set(info.value.errors) == {0, 1}
        assert {e[0] for e in info.value.errors.values()} == {"ModuleNotFoundError"}
    finally:
        pool.shutdown()
    assert _still_running(pool.pids) == []


def _forkserver_children() -> set:
    import multiprocessing.forkserver

    return set(forkserver._children_of(multiprocessing.forkserver._forkserver._forkserver_pid))


def test_initializer_failure_is_a_task_error_of_that_rank():
    get_pool(2, **KW)  # the fork server runs and has these children
    before = _forkserver_children()
    with pytest.raises(RankTaskError) as info:
        RankPool(2, initializer="tests.helpers.runner_tasks:initializer_failing_on_rank_1", timeout=30)
    err = info.value
    assert set(err.errors) == {1}
    assert err.errors[1].exc_type == "RuntimeError"
    assert "planted initializer failure on rank 1" in str(err)
    assert "initializer_failing_on_rank_1" in err.errors[1].traceback
    assert _forkserver_children() == before  # the failed pool's ranks are gone


def test_get_pool_replaces_a_pool_started_with_another_configuration():
    pool = get_pool(2, **KW)
    other = get_pool(2, timeout=25)
    assert other is not pool and not pool.alive
    assert _still_running(pool.pids) == []
    assert other.run(T.all_reduce_ranks) == [1.0, 1.0]
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


def test_unpicklable_task_is_refused_without_touching_the_pool():
    pool = get_pool(2, **KW)
    pids = pool.pids
    with pytest.raises(TypeError, match="cannot be pickled"):
        pool.run(lambda ctx: ctx.rank)
    assert pool.alive and pool.pids == pids
    assert pool.run(T.all_reduce_ranks) == [1.0, 1.0]


def test_rank_context_fields():
    ctx = RankContext(rank=1, world_size=2, backend="gloo")
    assert ctx.state == {} and ctx.tasks_run == 0


# -------------------------------------------------------------- faults ----


def test_error_on_rank_1_names_it_with_traceback_and_stacks_of_blocked_rank_0():
    pool = get_pool(2, **KW)
    pids = pool.pids
    with pytest.raises(RankTaskError) as info:
        pool.run(T.fail_on_rank_1, timeout=20)
    err = info.value
    report = str(err)
    assert set(err.errors) == {1}
    etype, message, tb = err.errors[1]
    assert etype == "ValueError" and message == "planted failure on rank 1"
    assert "planted_failure" in tb and "fail_on_rank_1" in tb and "Traceback" in tb
    assert "rank 1" in report and "planted failure on rank 1" in report and "planted_failure" in report
    assert "rank 0 raised" not in report
    # rank 0 waited in the all_reduce for the failed peer: reported as blocked
    assert err.pending == [0]
    assert "all_reduce" in err.stacks[0] and "fail_on_rank_1" in err.stacks[0]
    # the pool was retired and its processes are gone; the next one is fresh
    assert not pool.alive
    assert _still_running(pids) == []
    fresh = get_pool(2, **KW)
    assert fresh is not pool and set(fresh.pids).isdisjoint(pids)
    assert fresh.run(T.all_reduce_ranks) == [1.0, 1.0]


def test_system_exit_in_a_task_is_an_error_not_a_crash():
    pool = get_pool(2, **KW)
    with pytest.raises(RankTaskError) as info:
        pool.run(T.system_exit_on_rank_0)
    assert set(info.value.errors) == {0}
    assert info.value.errors[0].exc_type == "SystemExit"
    assert _still_running(pool.pids) == []


def test_crash_names_rank_and_exit_code_without_waiting_for_the_timeout():
    pool = get_pool(2, **KW)
    pids = pool.pids
    started = time.monotonic()
    with pytest.raises(RankCrash) as info:
        pool.run(T.exit_on_rank, 1, 7, timeout=60)
    elapsed = time.monotonic() - started
    assert info.value.exitcodes == {1: 7}
    assert "rank 1" in str(info.value) and "exited with code 7" in str(info.value)
    assert elapsed < 30  # sentinel-driven: far from the 60 s timeout
    assert _still_running(pids) == []
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


def test_segfault_is_a_crash_with_the_signal():
    pool = get_pool(2, **KW)
    with pytest.raises(RankCrash) as info:
        pool.run(T.segfault_on_rank, 0, timeout=60)
    assert info.value.exitcodes == {0: -11}
    assert "rank 0" in str(info.value) and "SIGSEGV" in str(info.value)
    assert _still_running(pool.pids) == []


def test_hang_on_rank_1_reports_stacks_of_all_ranks_within_the_timeout():
    pool = get_pool(2, **KW)
    pids = pool.pids
    started = time.monotonic()
    with pytest.raises(RankHang) as info:
        pool.run(T.hang_on_rank_1, timeout=2)
    elapsed = time.monotonic() - started
    hang = info.value
    assert 2 <= elapsed < 2 + 10
    assert hang.pending == [1]
    assert set(hang.stacks) == {0, 1}
    assert "planted_hang" in hang.stacks[1] and "hang_on_rank_1" in hang.stacks[1]
    assert "planted_hang" not in hang.stacks[0]  # rank 0 had reported: idle
    assert "rank(s) [1] did not report within 2 s" in str(hang)
    assert _still_running(pids) == []
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


def test_a_deadlock_is_a_hang_once_every_silent_rank_sleeps_for_quiet_seconds():
    # Rank 1 waits for an event nobody sets, rank 0 for rank 1 in a
    # collective: both asleep, so the hang is called after `quiet`, not at
    # the 60 s timeout.
    pool = get_pool(2, quiet=3, **KW)
    started = time.monotonic()
    with pytest.raises(RankHang) as info:
        pool.run(T.planted_deadlock_on_rank_1, timeout=60)
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 20
    assert info.value.pending == [0, 1]
    assert "were asleep (main thread sleeping, under 10% of a core) for 3 s" in str(info.value)
    assert "before the 60 s timeout" in str(info.value)
    assert "planted_deadlock_on_rank_1" in info.value.stacks[1]
    assert _still_running(pool.pids) == []


def test_a_rank_that_computes_is_never_quiet_so_a_slow_task_is_not_a_hang():
    # Rank 0 sleeps in the collective for longer than `quiet`, but rank 1
    # is awake, computing: the task completes.
    pool = get_pool(2, quiet=1, **KW)
    assert pool.run(T.busy_rank_1_then_all_reduce, 4, timeout=60) == [2.0, 2.0]


def test_quiet_none_waits_for_the_timeout():
    pool = get_pool(2, quiet=None, **KW)
    started = time.monotonic()
    with pytest.raises(RankHang) as info:
        pool.run(T.planted_deadlock_on_rank_1, timeout=4)
    assert time.monotonic() - started >= 4
    assert "did not report within 4 s" in str(info.value)
    with pytest.raises(ValueError, match="quiet must be a finite number of seconds > 0, got -1"):
        get_pool(2, quiet=-1, **KW)


def test_hang_in_a_collective_only_rank_0_enters():
    pool = get_pool(2, **KW)
    with pytest.raises(RankHang) as info:
        pool.run(T.lonely_all_reduce, timeout=2)
    hang = info.value
    assert hang.pending == [0]
    assert set(hang.stacks) == {0, 1}
    assert "lonely_all_reduce" in hang.stacks[0] and "all_reduce" in hang.stacks[0]
    assert _still_running(pool.pids) == []


def test_result_that_cannot_be_pickled_on_the_rank():
    pool = get_pool(2, **KW)
    with pytest.raises(RankTaskError) as info:
        pool.run(T.unpicklable_result)
    assert set(info.value.errors) == {0, 1}
    assert "cannot be pickled" in info.value.errors[1].message
    assert _still_running(pool.pids) == []


def test_result_that_cannot_be_unpickled_in_the_parent():
    pool = get_pool(2, **KW)
    with pytest.raises(RankTaskError) as info:
        pool.run(T.result_failing_to_unpickle)
    err = info.value
    assert set(err.errors) == {0, 1}
    assert "could not be unpickled in the parent" in err.errors[0].message
    assert "planted unpickling failure of rank 1's result" in str(err)
    assert _still_running(pool.pids) == []
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


def test_a_retired_pool_refuses_tasks_and_shutdown_is_idempotent():
    pool = RankPool(1, timeout=30)
    pool.shutdown()
    pool.shutdown()
    assert not pool.alive
    with pytest.raises(RankPoolFault, match="retired"):
        pool.run(T.all_reduce_ranks)
    assert _still_running(pool.pids) == []


def test_shutdown_all_leaves_no_rank_process():
    pools = [get_pool(2, **KW), get_pool(1, **KW)]
    pids = [pid for p in pools for pid in p.pids]
    assert all(_running(pid) for pid in pids)
    shutdown_all()
    assert _still_running(pids) == []
    assert lifecycle._pools == {}
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


# ------------------------------------------------------------- output ----


def test_what_each_rank_prints_is_captured_per_task_by_every_route():
    pool = get_pool(2, **KW)
    assert pool.run(T.chatty, "first") == [0, 1]
    out = pool.last_output
    assert set(out) == {0, 1}
    for rank in (0, 1):
        for route in ("python stdout", "python stderr", "fd 1", "fd 2", "libc printf", "subprocess stdout", "subprocess stderr"):
            assert f"first {route} rank {rank}\n" in out[rank], (route, out[rank])
        assert f"rank {1 - rank}" not in out[rank]  # per rank
    # only what the last task printed
    pool.run(T.chatty, "second")
    assert "first" not in pool.last_output[0] and "second fd 1 rank 0" in pool.last_output[0]
    pool.run(T.all_reduce_ranks)
    assert pool.last_output == {0: "", 1: ""}


def test_a_long_output_keeps_its_last_64_kib_with_a_marker():
    pool = get_pool(2, **KW)
    pool.run(T.print_lines, 2000, 100, 1)  # 200 kB on rank 1
    out = pool.last_output
    assert out[0] == ""
    text = out[1]
    assert text.startswith("[lora-harness: the first ") and "bytes of rank 1's output during this task were dropped" in text
    assert len(text.encode()) <= harness.pool.OUTPUT_KEEP_BYTES + 200
    assert text.endswith(f"line 001999 {'x' * 87}\n")
    assert "line 000000" not in text
    # the next task starts from a clean slate
    pool.run(T.print_lines, 2, 20, 1)
    assert pool.last_output[1] == "line 000000 xxxxxxx\nline 000001 xxxxxxx\n"


def test_a_fault_carries_each_ranks_output_and_its_report_the_tail():
    pool = get_pool(2, **KW)
    with pytest.raises(RankTaskError) as info:
        pool.run(T.print_then_fail_on_rank_1, 30)
    err = info.value
    assert err.output[0] == "rank 0 entering all_reduce\n"
    assert err.output[1] == "".join(f"rank 1 progress {i}\n" for i in range(30))
    assert pool.last_output == err.output
    report = str(err)
    assert "--- output of rank 1" in report and "last 20 of 30 lines" in report
    assert "rank 1 progress 29" in report and "rank 1 progress 10\n" in report
    assert "rank 1 progress 9\n" not in report  # only the tail
    assert "rank 0 entering all_reduce" in report
    # faults with nothing printed carry empty texts and no output section
    with pytest.raises(RankTaskError) as info:
        get_pool(2, **KW).run(T.fail_everywhere)
    assert info.value.output == {0: "", 1: ""} and "--- output of" not in str(info.value)


CHATTY_SCRIPT = textwrap.dedent(
    """
    import json
    from harness.pool import get_pool, RankTaskError
    from tests.helpers import runner_tasks as T
    pool = get_pool(2, timeout=60)
    pool.run(T.chatty, "loud")
    outputs = [pool.last_output]
    try:
        pool.run(T.print_then_fail_on_rank_1, 5)
    except RankTaskError as exc:
        outputs.append(exc.output)
    print(json.dumps(outputs), flush=True)
    """
)


def test_a_chatty_task_puts_nothing_on_the_owners_terminal(tmp_path):
    proc = _spawn(CHATTY_SCRIPT, tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _reap(proc)
    assert proc.returncode == 0, err
    assert len(out.strip().splitlines()) == 1, out  # the JSON line only
    assert "loud" not in err and "rank 1 progress" not in err and "entering all_reduce" not in err, err
    chatty, failed = json.loads(out)
    assert "loud subprocess stderr rank 1" in chatty["1"]
    assert "rank 1 progress 4" in failed["1"]


# ---------------------------------------------------------- error grace ----


def test_no_grace_is_waited_when_every_rank_has_reported():
    pool = RankPool(2, timeout=30, error_grace=20)
    started = time.monotonic()
    with pytest.raises(RankTaskError) as info:
        pool.run(T.fail_everywhere)
    assert time.monotonic() - started < 5  # far below the 20 s grace
    assert set(info.value.errors) == {0, 1} and info.value.pending == []
    assert _still_running(pool.pids) == []


def test_the_error_grace_is_short_by_default_and_an_argument():
    assert timeouts.ERROR_GRACE_S == harness.pool.ERROR_GRACE_S == 0.5
    assert get_pool(2, **KW).error_grace == 0.5
    for grace in (0.5, 0.1):
        pool = get_pool(2, **KW, error_grace=grace)
        assert pool.error_grace == grace
        started = time.monotonic()
        with pytest.raises(RankTaskError) as info:
            pool.run(T.fail_on_rank_1)
        elapsed = time.monotonic() - started
        assert info.value.pending == [0]  # still reported as blocked, with its stack
        assert "all_reduce" in info.value.stacks[0]
        assert f"no report within {grace:g} s after the first fault: blocked" in str(info.value)
        assert grace <= elapsed < grace + 1.5  # the old fixed grace alone was 2 s
    assert get_pool(2, **KW).error_grace == 0.5  # the latest call's value (default)


# ------------------------------------------------------------ Ctrl-C ----


def test_ctrl_c_while_unpickling_a_result_propagates_and_kills_the_ranks():
    pool = get_pool(2, **KW)
    pids = pool.pids
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="planted Ctrl-C"):
        pool.run(T.result_interrupting_unpickle)
    assert time.monotonic() - started < 2
    assert not pool.alive and "KeyboardInterrupt" in pool.retire_reason
    assert _still_running(pids, within=0.5) == []
    assert not os.path.exists(pool._dir)
    assert get_pool(2, **KW).run(T.all_reduce_ranks) == [1.0, 1.0]


SIGINT_SCRIPT = textwrap.dedent(
    """
    import json, time
    from harness.pool import get_pool
    from tests.helpers import runner_tasks as T
    pool = get_pool(2, timeout=60)
    assert pool.run(T.all_reduce_ranks) == [1.0, 1.0]
    print(json.dumps({"ranks": pool.pids, "dir": pool._dir}), flush=True)
    try:
        pool.run(T.hang_everywhere)
    except BaseException as exc:
        print(json.dumps({
            "caught": type(exc).__name__,
            "at": time.time(),
            "alive": pool.alive,
            "reason": pool.retire_reason,
            "report": str(exc)[:2000],
        }), flush=True)
        raise
    """
)


def test_ctrl_c_while_waiting_for_the_ranks_propagates_and_kills_them_at_once(tmp_path):
    proc = _spawn(SIGINT_SCRIPT, tmp_path)
    try:
        info = json.loads(_read_line(proc, 120))
        time.sleep(0.5)  # the ranks are in the task, the owner waits for them
        sent = time.time()
        os.kill(proc.pid, signal.SIGINT)
        caught = json.loads(_read_line(proc, 10))
        assert caught["caught"] == "KeyboardInterrupt", caught
        assert caught["at"] - sent < 1.5  # ranks killed and reaped meanwhile
        assert not caught["alive"] and "KeyboardInterrupt" in caught["reason"]
        assert _still_running(info["ranks"], within=0.2) == []
        assert not os.path.exists(info["dir"])
        out, err = proc.communicate(timeout=30)
        # an uncaught KeyboardInterrupt ends Python by SIGINT, the conventional status
        assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err
        assert "RankTaskError" not in err and "raised KeyboardInterrupt" not in err
        assert _session_left(proc.pid) == []
        assert _pool_dirs(tmp_path) == []
    finally:
        _reap(proc)


# ------------------------------------------------- temporary directories ----


def test_pool_directories_are_removed_on_shutdown_and_on_a_fault():
    pool = RankPool(2, timeout=30)
    assert os.path.isdir(pool._dir) and os.path.basename(pool._dir).startswith("lora-harness-ws2-")
    pool.shutdown()
    assert not os.path.exists(pool._dir)
    pool = get_pool(2, **KW)
    with pytest.raises(RankCrash):
        pool.run(T.exit_on_rank, 0, 3)
    assert not os.path.exists(pool._dir)


NORMAL_EXIT_SCRIPT = textwrap.dedent(
    """
    import json
    from harness.pool import RankPool, RankTaskError, get_pool
    from tests.helpers import runner_tasks as T
    cached = get_pool(2, timeout=60)
    direct = RankPool(1, timeout=60)  # never shut down explicitly
    cached.run(T.chatty)
    direct.run(T.chatty)
    try:
        get_pool(2, timeout=60).run(T.fail_on_rank_1)
    except RankTaskError:
        pass
    print(json.dumps({"dirs": [cached._dir, direct._dir, get_pool(2, timeout=60)._dir]}), flush=True)
    """
)


def test_no_pool_directory_or_process_is_left_after_a_normal_exit(tmp_path):
    proc = _spawn(NORMAL_EXIT_SCRIPT, tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        dirs = json.loads(out)["dirs"]
        assert len(set(dirs)) == 3 and all(os.path.dirname(d) == str(tmp_path) for d in dirs)
        assert _pool_dirs(tmp_path) == []
        assert _session_left(proc.pid) == []
    finally:
        _reap(proc)


# ------------------------------------------------ missing __main__ guard ----


UNGUARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from harness.pool import get_pool
    from tests.helpers import runner_tasks as T

    # no `if __name__ == "__main__":` guard: the ranks re-import this file
    pool = get_pool(2, timeout=300)
    print(pool.run(T.all_reduce_ranks))
    """
)


def test_a_script_without_the_main_guard_stops_at_once_with_the_fix(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.format(root=ROOT))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=_child_env(tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _reap(proc)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    # ~10 s on an idle 2-core machine (two imports of torch: the script and the
    # fork server); bounded loosely for a loaded one, far below the 300 s
    # ceiling a hang would take
    assert elapsed < 60, elapsed
    assert harness.pool.MAIN_GUARD_MESSAGE in err
    assert 'put the code that starts the pools under `if __name__ == "__main__":`' in err
    assert "RankCrash" in err and "exited with code 87" in err
    assert "An attempt has been made to start a new process" not in err  # not multiprocessing's riddle
    assert _session_left(proc.pid) == []
    assert _pool_dirs(tmpdir) == []


def test_a_task_cannot_start_a_pool_inside_a_rank():
    with pytest.raises(RankTaskError, match="cannot be started inside a rank process"):
        get_pool(2, **KW).run(T.start_nested_pool)


# ------------------------------------------------------ timeout policy ----


def test_timeout_policy(monkeypatch):
    monkeypatch.setattr(timeouts, "_slowest_ok_s", {})
    assert timeouts.task_timeout(2, "gloo") == 60.0  # first task: the ceiling
    timeouts.record_success(2, "gloo", 0.05)
    assert timeouts.task_timeout(2, "gloo") == 10.0  # floor
    timeouts.record_success(2, "gloo", 3.0)
    timeouts.record_success(2, "gloo", 0.01)  # slowest is kept
    assert timeouts.task_timeout(2, "gloo") == 30.0  # 10 x slowest
    timeouts.record_success(2, "gloo", 100.0)
    assert timeouts.task_timeout(2, "gloo") == 60.0  # capped by the ceiling
    assert timeouts.task_timeout(4, "gloo") == 60.0  # per world size
    assert timeouts.task_timeout(2, "gloo", ceiling=5.0) == 5.0
    assert timeouts.task_timeout(2, "gloo", ceiling=20.0) == 20.0
    assert timeouts.task_timeout(2, "gloo", ceiling=None) == timeouts.DEFAULT_TIMEOUT_S == 60.0
    with pytest.raises(ValueError, match="timeout"):
        timeouts.task_timeout(2, "gloo", ceiling=0)


def test_the_timeout_is_an_argument_not_an_environment_variable(monkeypatch):
    assert not hasattr(timeouts, "TIMEOUT_ENV") and not hasattr(harness.pool, "TIMEOUT_ENV")
    monkeypatch.setenv("LORA_HARNESS_RANK_TIMEOUT", "1")  # the retired variable: ignored
    assert timeouts.default_timeout() == timeouts.DEFAULT_TIMEOUT_S == 60.0
    pool = RankPool(1)
    try:
        assert pool.timeout == 60.0
        assert pool.next_timeout <= 60.0 and pool.next_timeout >= min(60.0, timeouts.ADAPTIVE_FLOOR_S)
    finally:
        pool.shutdown()
    pool = RankPool(1, timeout=7)
    try:
        assert pool.timeout == 7.0 and pool.next_timeout <= 7.0
    finally:
        pool.shutdown()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "60", True])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0"):
        RankPool(1, timeout=bad)
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0"):
        get_pool(1, timeout=bad)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.5"])
def test_an_error_grace_that_is_not_seconds_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match=r"error_grace must be a finite number of seconds >= 0"):
        RankPool(1, error_grace=bad)


def test_a_bad_run_timeout_is_refused_without_touching_the_pool():
    pool = get_pool(2, **KW)
    pids = pool.pids
    for bad in (0, -5, float("nan"), "10"):
        with pytest.raises(ValueError, match="timeout must be"):
            pool.run(T.all_reduce_ranks, timeout=bad)
    assert pool.alive and pool.pids == pids
    assert pool.run(T.all_reduce_ranks, timeout=10) == [1.0, 1.0]


def test_adaptive_timeout_is_used_after_a_success_and_survives_replacement():
    pool = get_pool(2, **KW)
    pool.run(T.all_reduce_ranks)
    slowest = timeouts._slowest_ok_s[(2, "gloo")]
    expected = min(30.0, max(timeouts.ADAPTIVE_FLOOR_S, timeouts.ADAPTIVE_FACTOR * slowest))
    assert pool.next_timeout == expected
    pool.shutdown()
    assert get_pool(2, **KW).next_timeout == expected


# ------------------------------------- messages, fault reports, re-exports ----


def test_messages_are_typed_and_survive_pickling():
    from harness.pool.messages import RemoteError, RunNamedTask, RunTask, Stop, TaskDone, TaskRaised

    error = RemoteError("ValueError", "boom", "Traceback ...")
    exc_type, message, tb = error  # still unpacks as the (type, message, traceback) it always was
    assert (exc_type, message, tb) == ("ValueError", "boom", "Traceback ...")
    for msg in (RunTask(3, b"payload"), RunNamedTask("m:f", {"case": 1}, True), Stop(),
                TaskDone(b"v", task_id=3, output="printed"), TaskRaised(error, output="printed")):
        assert pickle.loads(pickle.dumps(msg)) == msg
    assert TaskDone(b"").ok and not TaskRaised(error).ok


def test_task_names_resolve_back_to_the_task():
    from harness.pool.messages import resolve, task_name

    assert task_name(T.all_reduce_ranks) == "tests.helpers.runner_tasks:all_reduce_ranks"
    assert resolve(task_name(T.all_reduce_ranks), "task") is T.all_reduce_ranks
    with pytest.raises(ValueError, match="initializer 'no_colon' must look like 'package.module:function'"):
        resolve("no_colon")


def test_the_fault_report_names_ranks_pids_stacks_and_output():
    from harness.pool.faults import make_fault
    from harness.pool.messages import RemoteError

    common = dict(world_size=2, limit=12.5, grace=0.5, hang_note="Timeout policy: explicit timeout= argument.",
                  output={0: "", 1: "\n".join(f"line {i}" for i in range(25)) + "\n"}, pids=[10, 11], trailer="Retired.")
    hang = make_fault("task m:f on 2 ranks (gloo)", errors={}, stacks={0: "s0", 1: "s1"}, pending=[1], **common)
    assert isinstance(hang, RankHang) and hang.pending == [1] and hang.timeout == 12.5
    text = str(hang)
    assert text.startswith("RankHang in task m:f on 2 ranks (gloo): rank(s) [1] did not report within 12.5 s "
                           "(reported: [0]). Timeout policy: explicit timeout= argument.\n")
    assert "--- Python stacks of rank 0 (pid 10, had reported):" in text
    assert "--- Python stacks of rank 1 (pid 11, pending, no report):" in text
    assert "--- output of rank 1 (pid 11) during this task, last 20 of 25 lines (all: .output[1]):" in text
    assert "line 4\n" not in text and "    line 24\n" in text and text.endswith("\nRetired.")
    error = make_fault("t", errors={1: RemoteError("ValueError", "boom", "tb")}, stacks={0: "s0"}, pending=[0], **common)
    assert isinstance(error, RankTaskError) and error.pending == [0] and error.output is common["output"]
    assert "rank 1 raised ValueError: boom" in str(error)
    assert "--- Python stacks of rank 0 (pid 10, no report within 0.5 s after the first fault: blocked):" in str(error)
    crash = make_fault("t", errors={}, stacks={}, pending=[], dead={1: 87}, **common)
    assert isinstance(crash, RankCrash) and crash.exitcodes == {1: 87}
    assert str(crash).startswith(harness.pool.MAIN_GUARD_MESSAGE + "\nRankCrash in t: rank 1 (pid 11) exited with code 87 ")


def test_the_torchrun_executor_reports_faults_with_the_pools_report():
    import types

    from harness.launch import TorchrunExecutor
    from harness.pool.messages import RemoteError

    executor = types.SimpleNamespace(world=types.SimpleNamespace(world_size=3), timeout=30.0, error_grace=2.0)
    hang = TorchrunExecutor._fault(executor, "task m:f on 3 torchrun ranks (gloo)", 15.0, {}, {1: "stack"}, [1], {})
    assert isinstance(hang, RankHang)
    assert str(hang).startswith(
        "RankHang in task m:f on 3 torchrun ranks (gloo): rank(s) [1] did not report within 15 s (reported: [0, 2]). "
        "Timeout: --rank-timeout 30 s, adaptive after the first task as in the local pool.\n"
        "--- Python stacks of rank 1 (pending, no report):\n    stack\n")
    assert "The torchrun world is lost (rank(s) [1] cannot take another task)" in str(hang)
    raised = TorchrunExecutor._fault(executor, "t", 15.0, {1: RemoteError("E", "m", "tb")}, {}, [], {1: "out"})
    assert isinstance(raised, RankTaskError) and raised.output == {1: "out"}
    assert "(pid" not in str(raised) and "torchrun world is lost" not in str(raised)


def test_harness_runner_re_exports_the_pool_package():
    assert harness.runner.__all__ == harness.pool.__all__
    for name in harness.pool.__all__:
        assert getattr(harness.runner, name) is getattr(harness.pool, name), name


# -------------------------------------------------- separate processes ----


def _child_env(tmpdir=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if tmpdir is not None:  # a private temp dir: "no lora-harness-ws* left" is then exact
        env["TMPDIR"] = str(tmpdir)
    return env


def _session_members(sid: int) -> list:
    """Live processes of session ``sid``: a child started with ``start_new_session`` leads its own
    session, and every process it starts (fork server, ranks, resource tracker) stays in that
    session even once orphaned and reparented."""
    return procfs.session_members(sid)


def _session_left(sid: int, within: float = 5.0) -> list:
    deadline = time.monotonic() + within
    while True:
        left = _session_members(sid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _pool_dirs(tmpdir) -> list:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("lora-harness-ws"))


def _spawn(script: str, tmpdir, *argv) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        cwd=ROOT,
        env=_child_env(tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )


def _reap(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    left = _session_members(proc.pid)
    for pid in left:  # never leave a stray behind for the next test
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _read_line(proc, timeout):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"child printed nothing within {timeout} s; stderr: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"child exited early: {proc.wait()}; stderr: {proc.stderr.read()}")
    return line


OWNER_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing.forkserver, multiprocessing.process, multiprocessing.resource_tracker, signal
    from harness.pool import get_pool
    from tests.helpers import runner_tasks as T
    pool = get_pool(2, timeout=60)
    assert pool.run(T.all_reduce_ranks) == [1.0, 1.0]
    other = get_pool(1, timeout=60)  # a second pool: a second directory
    print(json.dumps({
        "ranks": pool.pids + other.pids,
        "forkserver": multiprocessing.forkserver._forkserver._forkserver_pid,
        "resource_tracker": multiprocessing.resource_tracker._resource_tracker._pid,
        "dirs": [pool._dir, other._dir],
        "socket_dir": multiprocessing.process.current_process()._config.get("tempdir"),
        "sigterm_handler": getattr(signal.getsignal(signal.SIGTERM), "__name__", None),
    }), flush=True)
    pool.run(T.hang_everywhere)  # ranks busy, not listening: only the watchdog ends them
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_outlives_the_owner_killed_by_a_signal(sig, tmp_path):
    """SIGKILL: the ranks' watchdogs end them and remove the directories. SIGTERM:
    the owner's handler does, and the owner still dies by SIGTERM."""
    proc = _spawn(OWNER_SCRIPT, tmp_path)
    try:
        info = json.loads(_read_line(proc, 120))
        ranks = info["ranks"]
        assert all(_running(pid) for pid in ranks)
        assert all(os.path.isdir(d) and os.path.dirname(d) == str(tmp_path) for d in info["dirs"])
        members = set(_session_members(proc.pid))
        assert {proc.pid, info["forkserver"], info["resource_tracker"], *ranks} <= members
        assert info["sigterm_handler"] == "_on_sigterm"  # installed: SIGTERM had its default action
        time.sleep(0.5)  # let the ranks enter the hanging task
        os.kill(proc.pid, sig)
        assert proc.wait(30) == -sig
        # fork server, ranks, tracker: all gone (generous: a loaded 2-core machine exits slowly)
        assert _session_left(proc.pid, within=20) == []
        assert _still_running(ranks + [info["forkserver"], info["resource_tracker"]], within=1) == []
        deadline = time.monotonic() + 5
        while (_pool_dirs(tmp_path) or os.path.exists(info["socket_dir"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pool_dirs(tmp_path) == []
        # The fork server's socket directory too (outside tmp_path: pytest's tmp_path is too
        # long a path for a socket, so it is a short one under /tmp), which multiprocessing
        # removes only at a normal exit.
        assert info["socket_dir"] and not os.path.exists(info["socket_dir"])
    finally:
        _reap(proc)


IDLE_OWNER_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing.process, signal, time
    from harness.pool import get_pool, shutdown_all
    from tests.helpers import runner_tasks as T
    assert get_pool(2, timeout=60).run(T.all_reduce_ranks) == [1.0, 1.0]
    shutdown_all()  # no live pool left, the fork server still up
    print(json.dumps({"socket_dir": multiprocessing.process.current_process()._config.get("tempdir")}), flush=True)
    time.sleep(120)
    """
)


def test_sigterm_between_pools_removes_the_socket_dir(tmp_path):
    """An owner whose pools are all shut down (a pytest-xdist worker between layouts, when a CI job is
    cancelled with SIGTERM to its process group) still removes the fork server's socket directory."""
    proc = _spawn(IDLE_OWNER_SCRIPT, tmp_path)
    try:
        socket_dir = json.loads(_read_line(proc, 120))["socket_dir"]
        assert socket_dir and os.path.isdir(socket_dir)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
        assert not os.path.exists(socket_dir)
    finally:
        _reap(proc)


WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from harness.pool import get_pool, RankCrash, shutdown_all
    from tests.helpers import runner_tasks as T
    pids = []
    for i in range(4):
        pool = get_pool(2, timeout=60)
        pids.append(pool.pids)
        assert pool.run(T.sum_of_rank_multiples, i + 1) == [3 * (i + 1)] * 2
        try:
            pool.run(T.exit_on_rank, i % 2, 5)  # fault: the next get_pool starts a fresh world
        except RankCrash as exc:
            assert exc.exitcodes == {i % 2: 5}
    shutdown_all()
    print(json.dumps({"pids": pids}), flush=True)
    """
)


def test_two_processes_start_pools_concurrently_without_colliding():
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT],
            cwd=ROOT,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    all_pids = [pid for o in outputs for pair in o["pids"] for pid in pair]
    assert len(all_pids) == 16 and len(set(all_pids)) == 16  # 4 fresh worlds each
    assert _still_running(all_pids) == []


PRELOAD_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing.forkserver as fsm
    from harness.pool import RankPool
    from tests.helpers import runner_tasks as T
    a = RankPool(1, preload=("torch",), timeout=60)
    first_server = fsm._forkserver._forkserver_pid
    a.shutdown()
    b = RankPool(2, preload=("torch", "probe_a"), timeout=60)  # no rank alive: server restarted
    second_server = fsm._forkserver._forkserver_pid
    b_imports = b.run(T.imported_in, "probe_a")
    c = RankPool(1, preload=("torch", "probe_b"), timeout=60)  # b alive: server kept
    print(json.dumps({
        "servers": [first_server, second_server, fsm._forkserver._forkserver_pid],
        "b": b_imports,
        "c": c.run(T.imported_in, "probe_b"),
        "b_still_works": b.run(T.all_reduce_ranks),
    }), flush=True)
    """
)


def test_fork_server_is_restarted_for_a_longer_preload_only_when_idle(tmp_path):
    for name in ("probe_a", "probe_b"):
        (tmp_path / f"{name}.py").write_text("import os\nPID_AT_IMPORT = os.getpid()\n")
    env = _child_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    first, second, third = out["servers"]
    assert second != first and third == second
    # probe_a was imported once, by the restarted fork server, not by the ranks
    assert [imported for imported, _ in out["b"]] == [second, second]
    # probe_b could not be preloaded while b's ranks lived: the rank imported it
    [(imported, rank_pid)] = out["c"]
    assert imported == rank_pid
    assert out["b_still_works"] == [1.0, 1.0]
