"""The README's downstream test file, exactly as printed, against a correct and a wrong implementation.

A new user writes only that file (and has their package); these tests run it
in a fresh directory under ``pytest -n 2`` with reports, then replay the
printed failure and diff the two reports.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# It runs its own pytest with two workers: keep it apart from the other heavy
# (4-rank) tests so the 2 cores are not oversubscribed.
pytestmark = pytest.mark.xdist_group(name="lora-world4")


def readme_test_file() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Verify your own implementation", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under 'Verify your own implementation'"
    return match.group(1)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory, max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    root = tmp_path_factory.mktemp("downstream")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "lora.py").write_text("from lora.megatron import LoRA, LoRAMerge, VLMLoRA  # noqa: F401\n")
    (root / "test_my_lora.py").write_text(readme_test_file())
    return root


def _run(root, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{ROOT}")
    return subprocess.run(list(args), cwd=root, capture_output=True, text=True, timeout=timeout, env=env)


def _pytest(root, *args, workers="2"):
    return _run(root, sys.executable, "-m", "pytest", "-q", "-n", workers, "--dist", "loadgroup", "-p", "no:cacheprovider",
                "test_my_lora.py", "--tp", "2", "--lora-examples", "1", "--lora-no-designed", *args)


def test_readme_file_is_short_and_names_the_implementation():
    body = readme_test_file()
    assert 'LORA_IMPL = "mypkg.lora"' in body
    assert len(body.strip().splitlines()) <= 20


def test_readme_file_passes_a_correct_implementation_and_fails_a_wrong_one(downstream):
    # Every property of both families would cost CI minutes here (the suite's
    # tests/properties/test_properties.py runs them all): one property at a two-rank
    # layout of each family covers the file.
    good = _pytest(downstream, "--report", "good", "-k", "forward_matches-tp2-ep1-etp2-pp1] or moe-forward_matches-tp2-ep1-etp1-pp1-sp",
                   workers="0")
    assert good.returncode == 0, good.stdout[-4000:] + good.stderr[-2000:]
    assert re.search(r"\d+ passed", good.stdout)
    for name in ("results.json", "report.html", "summary.md"):
        assert (downstream / "good" / name).is_file(), name

    # The wrong one only where it is wrong (TP=2, no SP), so shrinking stays cheap.
    bad = _pytest(downstream, "--report", "bad", "--lora-impl", "tests.wrong_impls.scaled_on_rank1",
                  "-k", "forward_matches-tp2-ep1-etp2-pp1]", workers="0")
    out = bad.stdout
    assert bad.returncode == 1, out[-4000:]
    assert "forward_matches at tp2-ep1-etp2-pp1 for tests.wrong_impls.scaled_on_rank1: numeric" in out
    assert "minimal case: {" in out
    replay = re.search(r"replay: (lora-harness replay .*)", out).group(1)
    assert (downstream / "bad" / "report.html").is_file()

    # The printed replay command reproduces the failure as printed.
    argv = shlex.split(replay)
    rerun = _run(downstream, sys.executable, "-m", "harness.cli", *argv[1:], timeout=300)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    assert rerun.stdout.startswith("NUMERIC  forward_matches tp2-ep1-etp2-pp1")

    # The baseline diff names the cells that regressed and fails.
    diff = _run(downstream, sys.executable, "-m", "harness.cli", "report", "--baseline", "good/results.json", "bad/results.json")
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert re.search(r"REGRESSED\s+forward_matches\s+tp2-ep1-etp2-pp1", diff.stdout)
    same = _run(downstream, sys.executable, "-m", "harness.cli", "report", "--baseline", "good/results.json", "good/results.json")
    assert same.returncode == 0, same.stdout + same.stderr


def test_an_implementation_that_cannot_load_is_one_clear_error(downstream):
    res = _pytest(downstream, "--lora-impl", "no_such_pkg.lora")
    assert res.returncode == 4  # pytest's usage error
    err = res.stderr.strip().splitlines()
    assert any("lora-harness: --lora-impl: implementation 'no_such_pkg.lora' failed to import" in line for line in err)
    assert len(res.stdout.splitlines()) + len(err) < 10
