"""The two front doors, ``lora-harness`` and the pytest plugin, tried as a new user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.processes import default_sigint

from harness.pool import lifecycle, shutdown_all
from harness.cli import _Progress, main

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=600, env=None, cwd=ROOT):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_layouts_follow_tp_and_ep(capsys):
    assert main(["layouts", "--tp", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gpt  tp1-ep1-etp1-pp1  world 1", "gpt  tp2-ep1-etp2-pp1  world 2", "gpt  tp2-ep1-etp2-pp1-sp  world 2",
        "moe  tp1-ep1-etp1-pp1  world 1", "moe  tp2-ep1-etp1-pp1-sp  world 2", "moe  tp2-ep1-etp2-pp1-sp  world 2",
        "vlm  tp1-ep1-etp1-pp1  world 1", "vlm  tp2-ep1-etp2-pp1  world 2",
    ]
    assert main(["layouts", "--tp", "2", "--ep", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gpt  tp1-ep1-etp1-pp1  world 1", "gpt  tp1-ep2-etp1-pp1  world 2", "gpt  tp2-ep1-etp2-pp1  world 2",
        "gpt  tp2-ep1-etp2-pp1-sp  world 2", "gpt  tp2-ep2-etp2-pp1-sp  world 4",
        "moe  tp1-ep1-etp1-pp1  world 1", "moe  tp1-ep2-etp1-pp1  world 2", "moe  tp2-ep1-etp1-pp1-sp  world 2",
        "moe  tp2-ep1-etp2-pp1-sp  world 2", "moe  tp2-ep2-etp1-pp1-sp  world 2",
        "moe  tp2-ep2-etp1-pp1-dp2-sp  world 4", "moe  tp2-ep2-etp2-pp1-sp  world 4",
        "vlm  tp1-ep1-etp1-pp1  world 1", "vlm  tp2-ep1-etp2-pp1  world 2",
    ]


def test_verify_passes_and_writes_json_and_report(capsys, tmp_path):
    path = tmp_path / "out.json"
    rc = main(["verify", "--tp", "2", "--no-designed", "--examples", "3", "--property", "forward_matches", "--seed", "3",
               "--family", "gpt", "--json", str(path), "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS  forward_matches        tp1-ep1-etp1-pp1" in out
    assert "PASS  forward_matches        tp2-ep1-etp2-pp1 " in out
    assert "PASS  forward_matches        tp2-ep1-etp2-pp1-sp" in out
    assert "3 passed, 0 failed" in out
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    # In the run plan's order (harness.plan.cell_order, as under pytest): the most parallel layout first.
    assert [(c["property"], c["layout"], c["verdict"]) for c in data["cells"]] == [
        ("forward_matches", "tp2-ep1-etp2-pp1-sp", "pass"), ("forward_matches", "tp2-ep1-etp2-pp1", "pass"),
        ("forward_matches", "tp1-ep1-etp1-pp1", "pass"),
    ]
    assert all(c["examples"] >= 3 for c in data["cells"])
    assert {"torch", "megatron_core", "hypothesis"} <= set(data["environment"]) or "torch" in json.dumps(data["environment"])
    for name in ("results.json", "report.html", "summary.md"):
        assert (tmp_path / "rep" / name).is_file()


def test_a_failing_run_writes_valid_json_and_a_replay_that_reproduces(capsys, tmp_path):
    path = tmp_path / "fail.json"
    rc = main(["verify", "--tp", "2", "--no-designed", "--examples", "8", "--seed", "5", "--property", "forward_matches", "--family", "gpt",
               "--layout", "tp1-ep1-etp1-pp1", "--layout", "tp2-ep1-etp2-pp1",
               "--impl", "tests.wrong_impls.scaled_on_rank1", "--json", str(path), "--regressions", str(tmp_path / "reg")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "PASS  forward_matches        tp1-ep1-etp1-pp1" in out
    assert "FAIL  forward_matches        tp2-ep1-etp2-pp1 " in out and "(numeric)" in out
    assert "1 passed, 1 failed" in out and "-sp" not in out
    assert "@reproduce_failure" not in out
    # The report leads with the quantity that differs first.
    assert "[numeric] output on rank 1" in out
    cells = json.loads(path.read_text())["cells"]
    failing = [c for c in cells if c["verdict"] != "pass"]
    assert [c["minimal_case"]["layout"] for c in failing] == ["tp2-ep1-etp2-pp1"]
    stored = list((tmp_path / "reg").glob("forward_matches--tp2-ep1-etp2-pp1--*.json"))
    assert len(stored) == 1
    replay = next(line for line in out.splitlines() if "replay: " in line).split("replay: ", 1)[1]
    assert replay.startswith("lora-harness replay ") and str(stored[0]) in replay
    import shlex

    assert main(shlex.split(replay)[1:]) == 1
    assert capsys.readouterr().out.startswith("NUMERIC  forward_matches tp2-ep1-etp2-pp1")
    # The stored case is replayed first on the next run, before any draw.
    rc = main(["verify", "--tp", "2", "--no-designed", "--examples", "5", "--property", "forward_matches", "--layout", "tp2-ep1-etp2-pp1",
               "--family", "gpt", "--impl", "tests.wrong_impls.scaled_on_rank1", "--regressions", str(tmp_path / "reg")])
    out = capsys.readouterr().out
    assert rc == 1 and "stored regression case" in out and "replayed before any new draw" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--property", "no_such_property"], "unknown --property no_such_property"),
        (["verify", "--profile", "nightly"], "unknown --profile 'nightly'"),
        (["verify", "--impl", "no.such.module"], "implementation 'no.such.module' failed to import: ModuleNotFoundError"),
        (["verify", "--impl", "tests.impls.broken"], "failed to import: ZeroDivisionError"),
        (["verify", "--impl", "json"], "does not expose LoRA, VLMLoRA, LoRAMerge"),
        (["verify", "--examples", "0"], "argument --examples: 0 must be >= 1"),
        (["verify", "--rank-timeout", "0"], "argument --rank-timeout: 0 must be a positive number of seconds"),
        (["verify", "--rank-timeout", "-3"], "must be a positive number of seconds"),
        (["verify", "--tp", "3"], "--tp 3: the layout set runs every power of two"),
        (["verify", "--ep", "3"], "--ep 3: the layout set runs every power of two"),
        (["verify", "--tp", "0"], "argument --tp: 0 must be >= 1"),
        (["verify", "--layout", "tp4-ep1-etp4-pp1"], "--layout tp4-ep1-etp4-pp1 is not in the set of --tp 2 --ep 1"),
        (["layouts", "--tp", "0"], "argument --tp: 0 must be >= 1"),
        (["verify", "--json", "/nonexistent-dir/out.json"], "--json /nonexistent-dir/out.json: directory '/nonexistent-dir' does not exist"),
        (["replay", "--property", "forward_matches"], "give either a regression FILE or --case-json"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line_before_any_rank_starts(argv, message, capsys):
    shutdown_all()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not lifecycle._pools  # no rank process was started


def test_an_unwritable_report_directory_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["verify", "--report", str(blocker / "sub")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--report {blocker / 'sub'}" in err and len(err.strip().splitlines()) == 1
    assert not lifecycle._pools


def test_progress_updates_one_line_on_a_terminal_and_is_silent_otherwise():
    import io

    from harness.results import ExampleRecord, PropertyOutcome, Verdict

    class Tty(io.StringIO):
        def isatty(self):
            return True

    outcome = PropertyOutcome("forward_matches", "tp2-ep1-etp2-pp1", "x", examples=3)
    outcome.records.append(ExampleRecord("forward_matches", "tp2", {}, Verdict.NUMERIC, 0.1))
    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        progress = _Progress(stream)
        progress(outcome, outcome.records[0])
        progress.clear()
    assert "\rforward_matches" not in tty.getvalue()
    assert "forward_matches tp2-ep1-etp2-pp1: 3 examples, 1 failing so far" in tty.getvalue()
    assert plain.getvalue() == ""


def test_verify_in_a_subprocess_is_quiet_and_leaves_nothing_behind(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = _cli("verify", "--tp", "2", "--no-designed", "--examples", "2", "--property", "forward_matches", "--family", "gpt",
               "--layout", "tp2-ep1-etp2-pp1-sp", env={"TMPDIR": str(tmp)}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Apex" not in res.stdout + res.stderr and "Transformer Engine" not in res.stdout + res.stderr
    assert "No CUDA runtime" not in res.stderr
    time.sleep(0.5)
    assert not list(tmp.glob("lora-harness-ws*"))


def test_ctrl_c_ends_the_run_with_a_summary_not_a_failure(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    # Output to files, not pipes: a pipe stays open while any process that
    # inherited it lives, and waiting on it would time the wrong thing.
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "verify", "--tp", "2", "--examples", "500"],
            cwd=ROOT, stdout=out_f, stderr=err_f, text=True, env=env, preexec_fn=default_sigint,
        )
    # Wait until it is working on examples, then interrupt.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "lora-harness verify:" not in out_path.read_text():
        time.sleep(0.1)
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    try:
        # Generous: with 4-rank tests beside it on 2 cores, the interrupted
        # pool start and the shutdown of every pool take tens of seconds.
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"verify did not end within 120 s of Ctrl-C:\n{out_path.read_text()[-3000:]}\n"
                             f"{err_path.read_text()[-3000:]}") from None
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 130, out + err
    assert "interrupted:" in out and "cells finished" in out
    assert "KeyboardInterrupt" not in out + err and "Traceback" not in err
    assert "FAIL" not in out
    time.sleep(0.5)
    assert not list(Path(tmp_path).glob("lora-harness-ws*"))


def test_plugin_parametrizes_properties_and_layouts():
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "tests/properties/test_properties.py", "--collect-only", "--tp", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_property_holds[forward_matches-tp1-ep1-etp1-pp1]" in res.stdout and "tp2" not in res.stdout
    # (At --tp 2 --ep 2 the suite's own run of tests/properties/test_properties.py is the proof.)


def test_plugin_bad_options_are_usage_errors():
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "tests/properties/test_properties.py", "--tp", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 4 and "--tp 3" in res.stderr


PLUGIN_PROPERTY = '''
from harness import Property, register
from harness.results import Check, Location
from harness.compare import compare_tensors, tolerance_for


def check(ev):
    # A property of one's own: the logits are finite and the reference's are the same shape.
    result = Check("logits_shaped_like_reference")
    ref = ev.reference
    for rec in ev.impl:
        tol = tolerance_for(None, "float64")
        stats = compare_tensors(rec.output.new_zeros(rec.output.shape), ref.output.new_zeros(ref.output.shape), tol)
        result.compare(Location("output shape", None, (rec.rank,)), stats, tol)
    return result


register(Property(name="logits_shaped_like_reference", check=check, needs=("impl", "reference"),
                  doc="an extra property registered from outside the harness"))
'''


def test_a_property_registered_from_outside_reaches_the_cli(tmp_path):
    """Adding a property is adding a module: the CLI runs it without edits anywhere."""
    (tmp_path / "my_property.py").write_text(PLUGIN_PROPERTY)
    script = (
        "import sys, my_property\n"
        "from harness.cli import main\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(['verify', '--tp', '1', '--no-designed', '--examples', '2', '--property', 'logits_shaped_like_reference']))\n"
    )
    (tmp_path / "run.py").write_text(script)
    res = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS  logits_shaped_like_reference" in res.stdout
