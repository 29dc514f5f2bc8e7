"""The two front doors: ``lora-harness`` and the pytest plugin's options."""

import json
import os
import subprocess
import sys

import pytest

from harness.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layouts_lists_every_tp_size(capsys):
    assert main(["layouts", "--tp", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["tp1-ep1-etp1-pp1  world 1", "tp2-ep1-etp2-pp1  world 2"]


def test_verify_passes_and_prints_a_line_per_property_and_layout(capsys, tmp_path):
    path = tmp_path / "out.json"
    rc = main(["verify", "--tp", "2", "--examples", "4", "--property", "forward_matches", "--seed", "3", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS  forward_matches        tp1-ep1-etp1-pp1" in out
    assert "PASS  forward_matches        tp2-ep1-etp2-pp1" in out
    assert "2 passed, 0 failed" in out
    data = json.loads(path.read_text())
    assert [(d["prop"], d["layout"], d["passed"]) for d in data] == [
        ("forward_matches", "tp1-ep1-etp1-pp1", True),
        ("forward_matches", "tp2-ep1-etp2-pp1", True),
    ]
    assert all(d["examples"] >= 4 for d in data)


def test_verify_fails_with_the_minimal_example(capsys):
    rc = main(["verify", "--tp", "2", "--examples", "30", "--property", "forward_matches", "--impl", "tests.wrong_impls.scaled_on_rank1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "PASS  forward_matches        tp1-ep1-etp1-pp1" in out
    assert "FAIL  forward_matches        tp2-ep1-etp2-pp1" in out
    assert "@reproduce_failure" in out
    assert "1 passed, 1 failed" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--property", "no_such_property"], "unknown --property no_such_property"),
        (["verify", "--profile", "nightly"], "unknown --profile 'nightly'"),
        (["verify", "--impl", "no.such.module"], "No module named 'no'"),
        (["verify", "--impl", "json"], "does not expose LoRA, VLMLoRA, LoRAMerge"),
        (["verify", "--tp", "0"], "--tp and --ep must be >= 1"),
    ],
)
def test_verify_bad_usage_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _pytest(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-W", "ignore", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_plugin_parametrizes_layouts_from_tp():
    res = _pytest("tests/test_properties.py", "--collect-only", "--tp", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tp1-ep1-etp1-pp1" in res.stdout and "tp2" not in res.stdout
    res = _pytest("tests/test_properties.py", "--collect-only", "--tp", "2", "--ep", "2")
    assert "tp2-ep1-etp2-pp1" in res.stdout


def test_plugin_runs_the_suite_against_another_implementation():
    res = _pytest("tests/test_properties.py", "--lora-impl", "tests.wrong_impls.scaled_on_rank1", "-k", "forward and tp2")
    assert res.returncode == 1, res.stdout[-3000:]
    assert "forward_matches failed for impl tests.wrong_impls.scaled_on_rank1" in res.stdout
    res = _pytest("tests/test_properties.py", "--lora-impl", "json", "-k", "forward and tp1")
    assert res.returncode != 0
    assert "does not expose LoRA, VLMLoRA, LoRAMerge" in res.stdout + res.stderr
