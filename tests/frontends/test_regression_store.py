"""The regression store is input, not evidence: every file in it is checked before any rank starts,
and a read-only store (the project's own, under another implementation) is replayed, never written."""

import copy
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.pool import lifecycle, shutdown_all
from harness.cases import case_from_json
from harness.cli import main
from harness.regressions import REGRESSION_SCHEMA, RegressionStore, check_regression, read_regression_file

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "tests" / "regressions" / "merge_matches--tp1-ep1-etp1-pp1--797db6a18cb9.json"


def _good() -> dict:
    return json.loads(STORED.read_text())


def _store_with(tmp_path: Path, name: str, content: str | dict) -> RegressionStore:
    directory = tmp_path / "reg"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "good.json").write_text(STORED.read_text())
    (directory / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return RegressionStore(directory)


def test_the_projects_own_store_is_valid():
    assert RegressionStore(ROOT / "tests" / "regressions").validate() >= 1


def _mutated(change) -> dict:
    data = copy.deepcopy(_good())
    change(data)
    return data


BAD_FILES = {
    "truncated": (STORED.read_text()[:200], "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "a list": ("[1, 2]", "holds a list, not a regression file"),
    "foreign schema": (json.dumps({"schema": "something-else", "version": 1}), "\"schema\" is 'something-else'"),
    "no schema": (json.dumps({"hello": 1}), "\"schema\" is None"),
    "unknown version": (_mutated(lambda d: d.update(version=7)), "version 7 is not one this lora-harness reads (1)"),
    "no property": (_mutated(lambda d: d.pop("property")), "field 'property' is missing"),
    "no case": (_mutated(lambda d: d.pop("case")), "field 'case' is missing"),
    "property not a string": (_mutated(lambda d: d.update(property=3)), "field 'property' = 3: must be a non-empty string"),
    "case lacks its shape": (_mutated(lambda d: d["case"].pop("shape")), "case field 'shape' is missing"),
    "negative size": (_mutated(lambda d: d["case"]["shape"].update(hidden_size=-4)), "shape.hidden_size = -4: must be an integer >= 1"),
    "layout does not fit": (
        _mutated(lambda d: (d["case"].update(layout="tp2-ep1-etp2-pp1"), d.update(layout="tp2-ep1-etp2-pp1"),
                            d["case"]["shape"].update(num_query_groups=1))),
        "num_query_groups=1 must be divisible by TP=2",
    ),
    "layout differs from the case's": (_mutated(lambda d: d.update(layout="tp2-ep1-etp2-pp1")), "would never be replayed"),
}


@pytest.mark.parametrize("what", list(BAD_FILES))
def test_validate_names_the_bad_file_and_what_is_wrong(what, tmp_path):
    content, message = BAD_FILES[what]
    store = _store_with(tmp_path, "bad.json", content)
    with pytest.raises(ValueError) as info:
        store.validate()
    text = str(info.value)
    assert str(tmp_path / "reg" / "bad.json") in text and message in text, text
    assert "\n" not in text
    # Reading the store for a replay fails the same way: a bad file is never skipped silently.
    with pytest.raises(ValueError, match="bad.json"):
        store.cases("merge_matches", "tp1-ep1-etp1-pp1")


def test_validate_counts_files_and_several_bad_files_are_counted(tmp_path):
    store = _store_with(tmp_path, "bad1.json", "[]")
    (tmp_path / "reg" / "bad2.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad1\.json: holds a list.*\(and 1 more bad file there\)"):
        store.validate()
    assert RegressionStore(tmp_path / "absent").validate() == 0
    assert _store_with(tmp_path / "x", "other.json", _good()).validate() == 2
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        RegressionStore(tmp_path / "afile").validate()


def test_check_regression_returns_the_case():
    case = check_regression(_good(), "x")
    assert case.to_json() == _good()["case"]
    data, case2 = read_regression_file(STORED)
    assert data["schema"] == REGRESSION_SCHEMA and case2 == case


def test_a_read_only_store_replays_but_never_writes(tmp_path):
    directory = tmp_path / "reg"
    directory.mkdir()
    (directory / STORED.name).write_text(STORED.read_text())
    case = case_from_json(_good()["case"])
    read_only = RegressionStore(directory, writable=False)
    assert read_only.read_only and not read_only.writable
    assert read_only.save("forward_matches", case, "numeric", "boom") is None
    assert sorted(p.name for p in directory.iterdir()) == [STORED.name]
    assert [p.name for p, _ in read_only.cases("merge_matches", "tp1-ep1-etp1-pp1")] == [STORED.name]
    # Nothing is created for a read-only store, not even its directory.
    absent = RegressionStore(tmp_path / "absent", writable=False)
    absent.check_writable()
    assert absent.save("forward_matches", case, "numeric", "boom") is None
    assert not (tmp_path / "absent").exists()
    # A writable one stores the case, and what it writes validates.
    path = RegressionStore(directory).save("forward_matches", case, "numeric", "boom")
    assert path is not None and path.is_file()
    assert RegressionStore(directory).validate() == 2


def test_the_plugin_passes_a_read_only_store_and_no_file_name(monkeypatch, tmp_path):
    """The plugin hands the driver its store object; a read-only store keeps nothing, and the
    failure's replay command carries the case itself, never a file name."""
    import harness.driver as driver
    from hypothesis import settings

    from harness.layouts import ParallelLayout
    from harness.properties import Property
    from harness.pytest_plugin import HarnessSession
    from harness.results import Check, Verdict

    def planted(ev):
        result = Check("planted")
        result.fail("always", kind="numeric", check="planted")
        return result

    prop = Property(name="planted", check=planted, needs=(), doc="fails every example")
    seen = {}
    real = driver.CellSearch

    def spy(p, layout, impl, **kwargs):
        seen["store"] = kwargs["regressions"]
        kwargs["settings"] = settings(max_examples=1, database=None, deadline=None)
        return real(prop, layout, impl, **kwargs)

    class Config:
        def getoption(self, name):
            return None

    monkeypatch.setattr(driver, "CellSearch", spy)
    store = RegressionStore(tmp_path / "never-written", writable=False)
    session = HarnessSession(Config(), seed=1, store=store)
    # lora.megatron at a two-rank layout: no independent control, so the planted failure is charged.
    outcome = session.check("merge_matches", ParallelLayout(tp=2), "lora.megatron")
    assert seen["store"] is store
    assert outcome.verdict is Verdict.NUMERIC
    assert outcome.regression_file == ""
    assert "--case-json" in outcome.replay_command and "None" not in outcome.replay_command
    assert not (tmp_path / "never-written").exists()


def test_pyproject_names_the_store_as_an_ini_option_not_an_addopt():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["lora_regressions"] == "tests/regressions"
    assert "--regressions" not in ini.get("addopts", "")


STORE_PROBE = '''
def test_store(lora_harness):
    store = lora_harness.store
    print("STORE", None if store is None else store.directory.name, None if store is None else store.writable)
'''


# A stand-in implementation that imports nothing heavy (the store is the point here).
STUB_IMPL = "class LoRA: pass\nclass VLMLoRA: pass\nclass LoRAMerge: pass\n"


def _pytest(tmp_path, *args, ini="[pytest]\nlora_regressions = reg\n"):
    (tmp_path / "pytest.ini").write_text(ini)
    (tmp_path / "test_probe.py").write_text(STORE_PROBE)
    (tmp_path / "stub_impl.py").write_text(STUB_IMPL)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
         "test_probe.py", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}{__import__('os').pathsep}{ROOT}"},
    )


def test_the_ini_store_is_written_only_without_lora_impl(tmp_path):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / STORED.name).write_text(STORED.read_text())
    res = _pytest(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "STORE reg True" in res.stdout
    res = _pytest(tmp_path, "--lora-impl", "stub_impl")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "STORE reg False" in res.stdout


class _Config:
    """What ``_regression_store`` reads of a pytest config."""

    def __init__(self, root, regressions=None, impl=None, ini=""):
        self.options = {"lora_regressions": regressions, "lora_impl": impl}
        self.ini, self.inipath, self.rootpath = ini, root / "pytest.ini", root

    def getoption(self, name):
        return self.options[name]

    def getini(self, name):
        assert name == "lora_regressions"
        return self.ini


def test_an_explicit_store_replaces_the_ini_one_and_no_option_means_no_store(tmp_path):
    from harness.pytest_plugin import _regression_store

    (tmp_path / "reg").mkdir()
    # An explicit --regressions replaces the ini store and is written, whatever the implementation.
    store = _regression_store(_Config(tmp_path, regressions=str(tmp_path / "mine"), impl="stub_impl", ini="reg"))
    assert store.directory.name == "mine" and store.writable
    assert _regression_store(_Config(tmp_path, impl="stub_impl", ini="reg")).writable is False
    # No ini option, no --regressions: no store.
    assert _regression_store(_Config(tmp_path, impl="stub_impl")) is None


def test_a_bad_file_in_the_ini_store_is_one_usage_error(tmp_path):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "x.json").write_text('{"schema": "lora-harness-regression", "version": 1')
    res = _pytest(tmp_path)
    assert res.returncode == 4, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: lora-harness: lora_regressions = 'reg'"), res.stderr
    assert "x.json: not valid JSON" in err[0]
    assert "Traceback" not in res.stdout + res.stderr and "INTERNALERROR" not in res.stdout + res.stderr


def test_verify_refuses_a_store_with_a_foreign_file_before_any_rank_starts(tmp_path, capsys):
    shutdown_all()
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "notes.json").write_text(json.dumps({"schema": "my-notes", "text": "hello"}))
    rc = main(["verify", "--tp", "1", "--regressions", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lora-harness: --regressions: regression file ") and "notes.json" in err and "'my-notes'" in err
    assert not lifecycle._pools
