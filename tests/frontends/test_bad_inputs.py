"""Every bad input gets one clear line before any rank process starts, naming the value and the rule.

The CLI: ``lora-harness: ...`` (or argparse's ``lora-harness verify: argument ...``) on stderr,
exit 2; pytest: one ``UsageError`` line (exit 4), never an INTERNALERROR or a pluggy traceback.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.pool import lifecycle, shutdown_all
from harness.cli import main

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "tests" / "regressions" / "merge_matches--tp1-ep1-etp1-pp1--797db6a18cb9.json"
STUB_CLASSES = "class LoRA: pass\nclass VLMLoRA: pass\nclass LoRAMerge: pass\n"


def _one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not lifecycle._pools  # no rank process was started
    return lines[0]


@pytest.fixture(autouse=True)
def _no_pools():
    shutdown_all()
    yield


@pytest.fixture
def impl_dir(tmp_path, monkeypatch):
    """A folder on sys.path for implementation modules written by a test."""
    folder = tmp_path / "impls"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _write_impl(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(body)
    return name


# ------------------------------------------------------------ 1. --rank-timeout


@pytest.mark.parametrize(
    "value, message",
    [
        ("1e-9", "1e-09 must be at least 1 second"),
        ("0.5", "0.5 must be at least 1 second"),
        ("inf", "inf must be a finite number of seconds, from 1 to 86400"),
        ("nan", "nan is not a number of seconds"),
        ("100000", "100000 must be at most 86400 seconds"),
        ("-3", "-3 must be a positive number of seconds"),
        ("soon", "soon is not a number of seconds"),
    ],
)
@pytest.mark.parametrize("command", [["verify"], ["replay", "--property", "forward_matches", "--case-json", "{}"]])
def test_rank_timeout_is_bounded(command, value, message, capsys):
    rc = main([*command, "--rank-timeout", value])
    _one_line(capsys, rc, "argument --rank-timeout: " + message)


def test_rank_timeout_bounds_accept_what_they_say():
    from harness.settings import check_rank_timeout

    assert check_rank_timeout("1") == 1.0 and check_rank_timeout(86400) == 86400.0
    assert cli.parser().parse_args(["verify", "--rank-timeout", "2.5"]).rank_timeout == 2.5


# ------------------------------------------------------------ 2. --tp / --ep bounded by the world


@pytest.mark.parametrize(
    "argv",
    [["layouts", "--tp", "1024"], ["verify", "--tp", "1024"], ["verify", "--tp", "64", "--ep", "2"], ["layouts", "--ep", "128"]],
)
def test_sizes_beyond_the_largest_world_are_refused(argv, capsys):
    rc = main(argv)
    line = _one_line(capsys, rc, "the largest layout of the set needs a world of", "more than the 64 the harness runs",
                     "one process per rank")
    assert line.startswith("lora-harness: --tp ")


def test_world_bound_keeps_the_power_of_two_rule_and_a_torchrun_world_raises_it():
    from harness.settings import MAX_WORLD, layout_set

    assert MAX_WORLD == 64
    assert max(l.min_world_size for l in layout_set(8, 8)) == 64
    with pytest.raises(ValueError, match="world of 128 ranks"):
        layout_set(16, 8, "moe")
    assert max(l.min_world_size for l in layout_set(16, 8, "gpt", max_world=128)) == 128
    with pytest.raises(ValueError, match="--tp 48: the layout set runs every power of two"):
        layout_set(48)


# ------------------------------------------------------------ 3. LoRA that is not a class


@pytest.mark.parametrize("name", ["LoRA", "VLMLoRA", "LoRAMerge"])
def test_an_api_name_that_is_not_a_class_is_refused(name, impl_dir, capsys):
    body = STUB_CLASSES.replace(f"class {name}: pass", f"{name} = 3")
    module = _write_impl(impl_dir, f"not_a_class_{name.lower()}", body)
    rc = main(["verify", "--tp", "1", "--impl", module])
    _one_line(capsys, rc, f"{module}.{name} must be a class", "of type int", "--impl")
    from harness.contract import ImplLoadError, load_impl

    with pytest.raises(ImplLoadError, match=f"{module}.{name} must be a class"):
        load_impl(module)


def test_an_implementation_that_exits_while_importing_is_refused(impl_dir, capsys):
    module = _write_impl(impl_dir, "exits_on_import", "import sys\nsys.exit(3)\n")
    rc = main(["verify", "--tp", "1", "--impl", module])
    _one_line(capsys, rc, "implementation 'exits_on_import' failed to import: SystemExit: 3")


# ------------------------------------------------------------ 4. capabilities


@pytest.mark.parametrize(
    "caps, message",
    [
        ({"experts": "no"}, "['experts'] = 'no': must be True or False, not a str"),
        ({"lora_dtypes": "float32"}, "['lora_dtypes'] = 'float32': must be a list of adapter dtype names"),
        ({"vlm": None}, "['vlm'] = None: must be True or False"),
        ({"lora_dtypes": None}, "['lora_dtypes'] = None: must be a list"),
        ({"init_methods": ["xavier", "glorot"]}, "'glorot': not an init method name"),
        ({"init_methods": []}, "must list at least one init method"),
        ({"contract": "lenient"}, "['contract'] = 'lenient': must be one of strict, bridge"),
        ({"experts": True, "fp8": True}, "unknown keys ['fp8']"),
    ],
)
def test_capabilities_of_the_wrong_type_are_refused(caps, message, impl_dir, capsys):
    module = _write_impl(impl_dir, "caps_" + str(abs(hash(json.dumps(caps, sort_keys=True)))),
                         STUB_CLASSES + f"LORA_HARNESS_CAPABILITIES = {caps!r}\n")
    rc = main(["verify", "--tp", "1", "--impl", module])
    _one_line(capsys, rc, f"{module}.LORA_HARNESS_CAPABILITIES", message)


def test_capabilities_from_a_mapping_keep_working():
    from harness.contract import Capabilities, capabilities_of

    caps = Capabilities.from_mapping({"contract": "bridge", "experts": False, "lora_dtypes": [None, "float32"]})
    assert caps.contract == "bridge" and caps.experts is False and caps.lora_dtypes == (None, "float32")
    with pytest.raises(ValueError, match="Capabilities.a2a='yes': must be True or False"):
        Capabilities(a2a="yes")
    from harness.contract import ImplLoadError

    with pytest.raises(ImplLoadError, match=r"capabilities for m\['merge'\] = 1: must be True or False"):
        capabilities_of("m", {"merge": 1})


# ------------------------------------------------------------ 5. --json


def test_json_into_proc_is_refused_before_the_run(capsys):
    rc = main(["verify", "--tp", "1", "--json", "/proc/lora-harness-results.json"])
    _one_line(capsys, rc, "--json /proc/lora-harness-results.json: cannot be written")


def test_json_check_opens_the_file_and_leaves_no_trace(tmp_path, capsys):
    target = tmp_path / "out.json"
    cli._check_output_file(str(target))
    assert not target.exists()
    target.write_text("keep")
    cli._check_output_file(str(target))
    assert target.read_text() == "keep"
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, needle in (
        (["verify", "--json", ""], "--json '': give a file name"),
        (["verify", "--json", str(blocker / "x.json")], "is not a directory"),
        (["verify", "--json", str(tmp_path)], "is a directory; give a file name"),
    ):
        _one_line(capsys, main(argv), needle)


class _Results:
    def to_json(self):
        return {"schema": "lora-harness-results", "cells": [1, 2, 3]}


def test_results_that_cannot_be_written_at_the_end_go_to_a_fallback_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "gone"
    gone.mkdir()
    args = argparse.Namespace(json_path=str(gone / "results.json"), report_dir=None)
    gone.rmdir()  # checked before the run, vanished by its end
    cli._write_outputs(args, _Results())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lora-harness: --json {gone / 'results.json'}: cannot be written"), err
    fallback = Path(err[0].rsplit("the results are in ", 1)[1])
    assert fallback.parent == tmp_path and json.loads(fallback.read_text())["cells"] == [1, 2, 3]
    # Written cell by cell (quiet): the same file, said once.
    cli._write_outputs(args, _Results(), quiet=True)
    assert capsys.readouterr().err == ""
    assert list(tmp_path.glob("lora-harness-results-*.json")) == [fallback]


def test_a_report_that_cannot_be_written_at_the_end_keeps_the_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import harness.report.writer as writer

    def full_disk(results, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_report", full_disk)
    cli._write_outputs(argparse.Namespace(json_path=None, report_dir=str(tmp_path / "rep")), _Results())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report" in err[0] and "No space left on device" in err[0], err
    assert json.loads(Path(err[0].rsplit("the results are in ", 1)[1]).read_text())["cells"] == [1, 2, 3]


# ------------------------------------------------------------ 6. replay input


def _good_case() -> dict:
    return json.loads(STORED.read_text())["case"]


def _replay(capsys, *argv, prop="merge_matches"):
    return main(["replay", *argv, "--property", prop])


def test_replay_names_the_file_and_what_is_wrong(tmp_path, capsys):
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"case": {')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps(dict(_good_case(), shape=dict(_good_case()["shape"], num_layers=-1))))
    unfit = tmp_path / "unfit.json"
    unfit.write_text(json.dumps(dict(_good_case(), layout="tp2", shape=dict(_good_case()["shape"], num_query_groups=1))))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"schema": "lora-harness-results", "case": _good_case()}))
    future = tmp_path / "future.json"
    future.write_text(json.dumps(dict(json.loads(STORED.read_text()), version=2)))
    unmarked = tmp_path / "unmarked.json"
    unmarked.write_text(json.dumps({"case": _good_case()}))
    cases = [
        (malformed, "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 11)"),
        (listed, "a case must be a JSON object"),
        (negative, "case field shape.num_layers = -1: must be an integer >= 1"),
        (unfit, "GPTShape.num_query_groups=1 must be divisible by TP=2"),
        (foreign, "\"schema\" is 'lora-harness-results', not 'lora-harness-regression'"),
        (future, "regression file version 2 is not one this lora-harness reads (1)"),
        (unmarked, "\"schema\" is None, not 'lora-harness-regression'"),
        (tmp_path / "absent.json", "cannot be read (No such file or directory)"),
    ]
    for path, message in cases:
        line = _one_line(capsys, _replay(capsys, str(path)), message)
        assert line.startswith(f"lora-harness: replay {path}: "), line


@pytest.mark.parametrize(
    "case_json, message",
    [
        ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        ("not json", "not valid JSON (Expecting value at line 1 column 1)"),
        ("[]", "a case must be a JSON object"),
        ("{}", "case field 'family' is missing"),
        (json.dumps({k: v for k, v in _good_case().items() if k != "shape"}), "case field 'shape' is missing"),
        (json.dumps(dict(_good_case(), seed="zero")), "case field seed = 'zero': must be an integer"),
        (json.dumps(dict(_good_case(), layout="tp1-pp1-vpp2")), "vpp=2 is invalid with pp=1"),
        (json.dumps(dict(_good_case(), lora=dict(_good_case()["lora"], dim=0))), "case field lora.dim = 0: must be an integer >= 1"),
        (json.dumps(dict(_good_case(), shape=dict(_good_case()["shape"], hidden_size=0))), "shape.hidden_size = 0: must be an integer >= 1"),
        (json.dumps(dict(_good_case(), family="rnn")), "case field family = 'rnn': must be one of gpt, moe, vlm"),
        (json.dumps(dict(_good_case(), extra=1)), "case field 'extra': not a case field"),
    ],
)
def test_replay_case_json_is_checked_in_the_parent(case_json, message, capsys):
    line = _one_line(capsys, _replay(capsys, "--case-json", case_json), message)
    assert line.startswith("lora-harness: --case-json: "), line


def test_replay_property_and_impl_are_checked(capsys):
    good = json.dumps(_good_case())
    _one_line(capsys, _replay(capsys, "--case-json", good, prop="no_such"), "--property: unknown property 'no_such'; known:")
    _one_line(capsys, _replay(capsys, "--case-json", good, prop="vlm_freezing_follows_spec"),
              "does not apply to the gpt family")
    _one_line(capsys, main(["replay", "--case-json", good, "--property", "merge_matches", "--impl", " "]), "--impl ' ': give")


def test_a_bare_case_and_a_regression_file_are_both_accepted(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(_good_case()))
    for path in (bare, STORED):
        case = cli._replay_case(argparse.Namespace(file=str(path), case_json=None))
        assert case.to_json() == _good_case()
    assert cli._replay_case(argparse.Namespace(file=None, case_json=json.dumps(_good_case()))).to_json() == _good_case()


def test_validate_rejects_zero_sizes_in_a_case_built_in_python():
    from harness.cases import CaseError
    from harness.families.gpt.case import GPTCase
    from harness.families.gpt.model import GPTShape

    with pytest.raises(CaseError, match="shape.ffn_hidden_size = 0: must be an integer >= 1"):
        GPTCase(shape=GPTShape(ffn_hidden_size=0), lora={}, seed=0).validate()


# ------------------------------------------------------------ 10. --layout by parsed layout


def test_layout_short_names_are_accepted(monkeypatch, capsys):
    seen = {}

    def fake_run(args, plan, *rest, **kw):
        seen.update(names=list(plan.properties), layouts={f: [str(l) for l in ls] for f, ls in plan.layouts.items()})
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    assert main(["verify", "--tp", "2", "--layout", "tp1", "--layout", "tp2-sp", "--property", "forward_matches",
                 "--property", "forward_matches"]) == 0
    assert seen["names"] == ["forward_matches"]
    assert seen["layouts"]["gpt"] == ["tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1-sp"]
    assert seen["layouts"]["moe"] == ["tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1-sp"]
    _one_line(capsys, main(["verify", "--layout", "tp2-x"]), "--layout tp2-x: cannot parse layout 'tp2-x'")
    _one_line(capsys, main(["verify", "--layout", "tp4"]), "--layout tp4 is not in the set of --tp 2 --ep 1")


# ------------------------------------------------------------ other bad inputs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--seed", "-5"], "argument --seed: -5 must be an integer from 0 to 4294967295"),
        (["verify", "--seed", str(2**32)], "must be an integer from 0 to 4294967295"),
        (["verify", "--report", ""], "--report '': give a directory"),
        (["verify", "--regressions", ""], "--regressions '': give a directory"),
        (["verify", "--impl", ""], "give an importable module name"),
    ],
)
def test_other_bad_verify_inputs(argv, message, capsys):
    _one_line(capsys, main(argv), message)


# ------------------------------------------------------------ 11. report --baseline


def test_report_names_a_file_used_as_a_directory_and_the_unknown_schema(tmp_path, capsys):
    from harness.report.baseline import main as report_main
    from harness.results import SCHEMA_VERSION

    afile = tmp_path / "afile"
    afile.write_text("{}")
    assert report_main(["--baseline", str(afile / "results.json"), str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{afile} is a file, not a directory" in err[0] and "does not exist" not in err[0], err
    current = {"schema": "lora-harness-results", "schema_version": SCHEMA_VERSION, "cells": []}
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(current))
    new.write_text(json.dumps(dict(current, schema_version=SCHEMA_VERSION + 1)))
    assert report_main(["--baseline", str(old), str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{new} (the new run, NEW) has results schema version {SCHEMA_VERSION + 1}" in err[0], err
    assert f"reads version {SCHEMA_VERSION} only" in err[0] and "newer lora-harness" in err[0]
    assert "rerun the baseline" not in err[0]
    assert report_main(["--baseline", str(old), str(old), "--growth-factor", "inf"]) == 2
    assert "--growth-factor inf: must be a finite number > 1" in capsys.readouterr().err
    assert report_main([str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--baseline" in err[0], err


# ------------------------------------------------------------ pytest front end


def _pytest(tmp_path, *args, test_body="def test_nothing():\n    pass\n"):
    (tmp_path / "test_probe.py").write_text(test_body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
         "test_probe.py", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )


def _usage_error(res, *needles):
    out = res.stdout + res.stderr
    assert res.returncode == 4, out
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: lora-harness: "), out
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "INTERNALERROR" not in out and "Traceback" not in out and "pluggy" not in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--rank-timeout", "1e-9"], ["--rank-timeout 1e-09 must be at least 1 second"]),
        (["--rank-timeout", "inf"], ["--rank-timeout inf must be a finite number of seconds"]),
        (["--tp", "1024"], ["--tp 1024 --ep 1: the largest layout of the set needs a world of 1024 ranks"]),
        (["--lora-seed", "-1"], ["--lora-seed -1: must be an integer from 0 to"]),
        (["--hypothesis-profile", "nonexistent"], ["--hypothesis-profile 'nonexistent' is not a registered", "deep", "fast"]),
        (["--lora-impl", "not_a_class"], ["not_a_class.LoRA must be a class"]),
        (["--lora-impl", "bad_caps"], ["bad_caps.LORA_HARNESS_CAPABILITIES['experts'] = 'no': must be True or False"]),
        (["--report", ""], ["--report '': give a directory"]),
    ],
)
def test_plugin_bad_options_are_one_usage_error(args, needles, tmp_path):
    (tmp_path / "not_a_class.py").write_text(STUB_CLASSES.replace("class LoRA: pass", "LoRA = 3"))
    (tmp_path / "bad_caps.py").write_text(STUB_CLASSES + "LORA_HARNESS_CAPABILITIES = {'experts': 'no'}\n")
    _usage_error(_pytest(tmp_path, *args), *needles)


def test_a_test_modules_bad_capabilities_are_one_collection_error_line(tmp_path):
    (tmp_path / "bad_caps.py").write_text(STUB_CLASSES + "LORA_HARNESS_CAPABILITIES = {'lora_dtypes': 'float32'}\n")
    res = _pytest(tmp_path, "--collect-only",
                  test_body='LORA_IMPL = "bad_caps"\n\ndef test_p(lora_property):\n    pass\n')
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "lora-harness: test_probe: bad_caps.LORA_HARNESS_CAPABILITIES['lora_dtypes'] = 'float32'" in out
    assert "pluggy" not in out and "Traceback" not in out and "INTERNALERROR" not in out
