"""torchrun mode (``python -m harness.launch verify``): the same properties over a torchrun world, on CPU (gloo).

Each test launches ``torchrun`` in its own session and, once it has ended,
checks that no process of that session is left (workers, rank 0's local
world-1 pool and its fork server). Seconds measured on the 2-core machine
(load 3 to 8 from other work): the 4-process run 25-37, the planted raise
11-21 (these two run every time); nightly: the planted hang 28-41 (rank
timeout 15 s), a rank that dies 12, two simulated nodes 29-72 plus the
local run they are compared with 15.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Four rank processes (or two launches of two) on 2 cores: one at a time,
# apart from the other 4-rank tests.
pytestmark = pytest.mark.xdist_group(name="lora-world4")

VERIFY = ["verify", "--tp", "2", "--ep", "2", "--no-designed", "--examples", "1", "--property", "forward_matches", "--family", "gpt"]
# The dense layouts of --tp 2 --ep 2 (lora-harness layouts --tp 2 --ep 2).
GPT_LAYOUTS = {"tp1-ep1-etp1-pp1", "tp1-ep2-etp1-pp1", "tp2-ep1-etp2-pp1", "tp2-ep1-etp2-pp1-sp",
               "tp2-ep2-etp2-pp1-sp"}


def _torchrun_bin() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    from harness.pool import procfs

    return procfs.session_members(sid)


def _assert_nothing_left(sid: int) -> None:
    deadline = time.monotonic() + 10
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_members(sid)
    for pid in left:  # do not leak them into the next test, then fail
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind by torchrun (session {sid}): {left}"


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every launch (killing all on timeout), check none left a process; [(rc, output)]."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, text))
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s")
    finally:
        for p in procs:
            _assert_nothing_left(p.pid)
    return out


def _torchrun(nproc: int, args: list[str], timeout: float = 240) -> tuple[int, str, float]:
    started = time.monotonic()
    cmd = _torchrun_bin() + ["--standalone", "--nproc-per-node", str(nproc), "-m", "harness.launch", *args]
    [(rc, text)] = _finish([_launch(cmd)], timeout)
    return rc, text, time.monotonic() - started


def _verdicts(report: Path) -> dict:
    data = json.loads((report / "results.json").read_text())
    return {(c["property"], c["layout"]): c["verdict"] for c in data["cells"]}


def _cells(report: Path) -> list[dict]:
    return json.loads((report / "results.json").read_text())["cells"]


# One layout per world size a 4-rank launch serves (1, 2 and 4 ranks of
# the 4): what CI runs. Every layout of the set runs nightly.
SMALLER_LAYOUTS = ("tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1-sp", "tp2-ep2-etp2-pp1-sp")


def _four_ranks_pass(tmp_path, layouts: tuple[str, ...]) -> None:
    report = tmp_path / "report"
    only = [arg for layout in layouts for arg in ("--layout", layout)]
    rc, text, seconds = _torchrun(4, [*VERIFY, *only, "--seed", "7", "--report", str(report)])
    assert rc == 0, text[-4000:]
    assert "4 ranks, backend gloo" in text
    verdicts = _verdicts(report)
    assert {layout for _, layout in verdicts} == (set(layouts) or GPT_LAYOUTS), verdicts
    assert set(verdicts.values()) == {"pass"}, verdicts
    assert (report / "report.html").is_file() and (report / "summary.md").is_file()
    print(f"4-rank torchrun run: {seconds:.1f} s")


def test_four_ranks_run_a_layout_of_each_world_size_and_pass(tmp_path):
    _four_ranks_pass(tmp_path, SMALLER_LAYOUTS)


@pytest.mark.nightly
def test_four_ranks_run_every_layout_and_pass(tmp_path):
    _four_ranks_pass(tmp_path, ())


def test_a_rank_that_raises_is_a_crash_naming_the_rank(tmp_path):
    report = tmp_path / "report"
    rc, text, seconds = _torchrun(2, ["verify", "--tp", "2", "--layout", "tp2-ep1-etp2-pp1", "--no-designed", "--examples", "1",
                                      "--property", "forward_matches", "--family", "gpt", "--seed", "7",
                                      "--rank-timeout", "30", "--impl", "tests.wrong_impls.raises_in_forward",
                                      "--report", str(report)])
    assert rc != 0, text[-4000:]
    [cell] = _cells(report)
    assert cell["verdict"] == "crash", cell
    assert "rank 1 raised RuntimeError: custom kernel failed on rank 1" in cell["error"]
    assert "raises_in_forward.py" in cell["error"]  # rank 1's traceback
    assert "Python stacks of rank 0" in cell["error"]  # blocked in the collective with it
    assert seconds < 120
    print(f"planted raise under torchrun: {seconds:.1f} s")


@pytest.mark.nightly
def test_a_rank_that_hangs_is_reported_with_its_stack(tmp_path):
    report = tmp_path / "report"
    rc, text, seconds = _torchrun(2, ["verify", "--tp", "2", "--layout", "tp2-ep1-etp2-pp1", "--no-designed", "--examples", "1",
                                      "--property", "forward_matches", "--family", "gpt", "--seed", "7",
                                      "--rank-timeout", "15", "--impl", "tests.wrong_impls.hangs_on_rank1",
                                      "--report", str(report)])
    assert rc != 0, text[-4000:]
    [cell] = _cells(report)
    assert cell["verdict"] == "hang", cell
    assert "did not report within 15 s" in cell["error"]
    assert "Python stacks of rank 1" in cell["error"]
    assert "wait_forever_in_fc2_adapter" in cell["error"]  # rank 1's own stack
    assert "the torchrun world cannot run further tasks" in text
    assert seconds < 120
    print(f"planted hang under torchrun: {seconds:.1f} s")


@pytest.mark.nightly  # two torchrun worlds of 2 ranks and a local run: 100 s on 2 cores
def test_two_nodes_give_the_verdicts_of_a_local_run(tmp_path):
    port = _free_port()
    report = tmp_path / "nodes"
    started = time.monotonic()
    procs = [
        _launch(_torchrun_bin() + ["--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "lora-harness-test",
                                   "-m", "harness.launch", *VERIFY, "--seed", "11", "--report", str(report)])
        for node in (0, 1)
    ]
    results = _finish(procs, 300)
    nodes_s = time.monotonic() - started
    for rc, text in results:
        assert rc == 0, text[-4000:]
    started = time.monotonic()
    cli = Path(sys.executable).with_name("lora-harness")
    local = tmp_path / "local"
    base = [str(cli)] if cli.exists() else [sys.executable, "-m", "harness.cli"]
    run = subprocess.run([*base, *VERIFY, "--seed", "11", "--report", str(local)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    local_s = time.monotonic() - started
    assert _verdicts(report) == _verdicts(local)
    assert {layout for _, layout in _verdicts(report)} == GPT_LAYOUTS
    # The same examples were drawn (rank 0 of the torchrun world draws as the local CLI does).
    cases = lambda path: [e["case"] for e in json.loads((path / "results.json").read_text())["examples"]]  # noqa: E731
    assert cases(report) == cases(local)
    print(f"two simulated nodes: {nodes_s:.1f} s; local run: {local_s:.1f} s")



@pytest.mark.nightly
def test_a_rank_that_dies_ends_the_job_and_the_report_keeps_what_finished(tmp_path):
    report = tmp_path / "report"
    # tp1-ep2 (data parallelism 2, no TP rank 1) runs before tp2 (harness.plan.cell_order) and passes.
    rc, text, seconds = _torchrun(2, ["verify", "--tp", "2", "--ep", "2", "--layout", "tp1-ep2-etp1-pp1", "--layout", "tp2-ep1-etp2-pp1",
                                      "--no-designed", "--examples", "1", "--property", "forward_matches", "--family", "gpt", "--seed", "7",
                                      "--rank-timeout", "30", "--impl", "tests.wrong_impls.crashes_on_rank1",
                                      "--report", str(report)])
    assert rc != 0, text[-4000:]
    # torchrun's agent names the rank that died (record on the entry point) and ends the others.
    assert "exitcode  : 17" in text and "rank      : 1" in text, text[-4000:]
    # Rank 0 wrote the report after the cell before the death.
    assert _verdicts(report) == {("forward_matches", "tp1-ep2-etp1-pp1"): "pass"}
    print(f"a rank that dies under torchrun: {seconds:.1f} s")
