"""harness.report: results.json, report.html, summary.md, baseline diffs, environment.

Results are built synthetically (no megatron run): a passing cell, a numeric
failure with a minimal GPTCase, a contract finding, an advisory, a crash, a
hang and skipped cells, with ExampleRecords whose Comparisons come from real
ErrorStats/Tolerance values. The headless-browser test renders the page in
Chromium when it is installed (CI installs it: ci/setup.sh).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.families.gpt.case import GPTCase
from harness.compare import ErrorStats, Tolerance
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape
from harness.report import baseline
from harness.report.environment import collect_environment
from harness.report.writer import ReportDirectoryError, check_writable, render_summary, results_dict, write_report
from harness.results import (
    SCHEMA_VERSION,
    Comparison,
    ExampleRecord,
    Finding,
    Location,
    PropertyOutcome,
    RunResults,
    Verdict,
)

F64 = Tolerance(rtol=1e-9, atol=1e-12)
F32 = Tolerance(rtol=1e-3, atol=1e-6)
L1 = "tp1-ep1-etp1-pp1"
L2 = "tp2-ep1-etp2-pp1"
LAYOUTS = [L1, L2]
PROPS = ["forward_matches", "backward_matches", "initial_adapters_match", "merge_matches", "errors_follow_spec", "sequence_parallel"]
IMPL = "lora.megatron"


# ---------------------------------------------------------------- synthetic results


def _stats(ratio: float, tol: Tolerance = F64, ref_max: float = 2.0) -> ErrorStats:
    bound = tol.atol + tol.rtol * ref_max
    max_abs = ratio * bound
    passed = max_abs <= bound
    return ErrorStats(
        max_abs=max_abs, max_rel=max_abs / ref_max, mean_abs=max_abs / 10, ref_max=ref_max, numel=512,
        worst_index=None if math.isinf(max_abs) else (0, 3), passed=passed,
        reason="" if passed else f"max|diff|={max_abs:.3g} at (0, 3) > {bound:.3g}",
    )


def _comparison(ratio: float, quantity: str = "output", param: str | None = None, tol: Tolerance = F64) -> Comparison:
    return Comparison(Location(quantity, param, (0, 1)), _stats(ratio, tol), tol)


def _case(seed: int = 1, layout: str = L2) -> GPTCase:
    return GPTCase(shape=GPTShape(), lora={"dim": 4}, seed=seed, layout=ParallelLayout.parse(layout))


def _passing_records(prop: str, layout: str, n: int, rng: random.Random, lo: float = -5, hi: float = -3) -> list[ExampleRecord]:
    out = []
    for i in range(n):
        ratio = 10 ** rng.uniform(lo, hi)
        out.append(ExampleRecord(prop, layout, _case(i, layout).to_json(), Verdict.PASS, 0.2,
                                 [_comparison(ratio), _comparison(ratio / 3, "gradient", "decoder.layers.0.linear_qkv.adapter.linear_in.weight")]))
    return out


def _pass_cell(prop: str, layout: str, n: int, rng: random.Random, **kw) -> PropertyOutcome:
    records = _passing_records(prop, layout, n, rng, **kw)
    return PropertyOutcome(prop, layout, IMPL, Verdict.PASS, examples=n, seconds=0.2 * n, records=records)


REPLAY = "lora-harness replay --property forward_matches --case-json '{\"seed\": 1}'"


def make_results(*, failing: bool = True, seed: int = 0) -> RunResults:
    """A run over PROPS x LAYOUTS; ``failing=False``: the same run with every checked cell passing."""
    rng = random.Random(seed)
    outcomes: list[PropertyOutcome] = []
    n = 12
    # forward_matches: pass at tp1; numeric failure at tp2 (shrunk to a minimal case).
    outcomes.append(_pass_cell("forward_matches", L1, n, rng))
    if failing:
        minimal = _case(seed=1)
        records = _passing_records("forward_matches", L2, 5, rng)
        for ratio in (3e6, 4e5, 9e4):  # hypothesis shrinking: the minimal example runs last
            check = [_comparison(ratio)]
            findings = [Finding("numeric", f"output (gathered over ranks [0, 1]): {check[0].stats.reason}",
                                location=check[0].location)]
            records.append(ExampleRecord("forward_matches", L2, minimal.to_json(), Verdict.NUMERIC, 0.3, check, findings,
                                         error="forward_matches failed for impl lora.megatron at layout " + L2,
                                         output={0: "rank 0 says hi <b>not bold</b>", 1: ""}))
        outcomes.append(PropertyOutcome(
            "forward_matches", L2, IMPL, Verdict.NUMERIC, examples=len(records), seconds=3.0,
            error="forward_matches failed for impl lora.megatron at layout tp2-ep1-etp2-pp1:\n  [numeric] output differs <&>",
            falsifying_example="Falsifying example: check(case=GPTCase(...))", minimal_case=minimal,
            replay_command=REPLAY, records=records,
        ))
    else:
        outcomes.append(_pass_cell("forward_matches", L2, n, rng))
    outcomes.append(_pass_cell("backward_matches", L1, n, rng))
    outcomes.append(_pass_cell("backward_matches", L2, n, rng, lo=-6, hi=-2))
    # initial_adapters_match: pass, and a hang at tp2 (no comparisons).
    outcomes.append(_pass_cell("initial_adapters_match", L1, 4, rng))
    if failing:
        rec = ExampleRecord("initial_adapters_match", L2, _case(3).to_json(), Verdict.HANG, 60.0,
                            error="rank 1 did not finish within 60 s")
        outcomes.append(PropertyOutcome("initial_adapters_match", L2, IMPL, Verdict.HANG, examples=1, seconds=60.0,
                                        error="rank 1 did not finish within 60 s", minimal_case=_case(3),
                                        replay_command="lora-harness replay --property initial_adapters_match --case-json '{}'",
                                        records=[rec]))
    else:
        outcomes.append(_pass_cell("initial_adapters_match", L2, 4, rng))
    # merge_matches: pass; crash at tp2.
    outcomes.append(_pass_cell("merge_matches", L1, 6, rng))
    if failing:
        rec = ExampleRecord("merge_matches", L2, _case(4).to_json(), Verdict.CRASH, 0.1,
                            error="RuntimeError: merge failed on rank 0")
        outcomes.append(PropertyOutcome("merge_matches", L2, IMPL, Verdict.CRASH, examples=1, seconds=0.1,
                                        error="Traceback (most recent call last):\nRuntimeError: merge failed on rank 0",
                                        minimal_case=_case(4),
                                        replay_command="lora-harness replay --property merge_matches --case-json '{}'",
                                        records=[rec]))
    else:
        outcomes.append(_pass_cell("merge_matches", L2, 6, rng))
    # errors_follow_spec: contract finding at tp1, advisory at tp2 (no tensor comparisons).
    if failing:
        f = Finding("contract", "LoRA(dim=0) raised nothing; SPEC requires ValueError naming 'dim'", check="bad_dim")
        rec = ExampleRecord("errors_follow_spec", L1, _case(5, L1).to_json(), Verdict.CONTRACT, 0.1, findings=[f],
                            error="errors_follow_spec failed")
        outcomes.append(PropertyOutcome("errors_follow_spec", L1, IMPL, Verdict.CONTRACT, examples=1, seconds=0.1,
                                        error="errors_follow_spec failed for impl lora.megatron at layout tp1-ep1-etp1-pp1",
                                        minimal_case=_case(5, L1),
                                        replay_command="lora-harness replay --property errors_follow_spec --case-json '{}'",
                                        records=[rec]))
    else:
        rec = ExampleRecord("errors_follow_spec", L1, _case(5, L1).to_json(), Verdict.PASS, 0.1)
        outcomes.append(PropertyOutcome("errors_follow_spec", L1, IMPL, Verdict.PASS, examples=1, seconds=0.1, records=[rec]))
    adv = Finding("contract", "dropout_position='post' accepted; bridge contract allows it", check="dropout_position", binding=False)
    rec = ExampleRecord("errors_follow_spec", L2, _case(6).to_json(), Verdict.ADVISORY, 0.1, findings=[adv])
    outcomes.append(PropertyOutcome("errors_follow_spec", L2, IMPL, Verdict.ADVISORY, examples=1, seconds=0.1, records=[rec]))
    # sequence_parallel: skipped everywhere.
    for layout in LAYOUTS:
        outcomes.append(PropertyOutcome("sequence_parallel", layout, IMPL, Verdict.SKIPPED,
                                        skipped_reason="capabilities: sequence_parallel=False"))
    return RunResults(
        impl=IMPL,
        capabilities={"contract": "strict", "init_methods": ["xavier", "kaiming"], "lora_dtypes": [None, "float32"],
                      "experts": True, "sequence_parallel": False, "merge": True},
        environment={"impl": IMPL, "python": "3.12.1", "torch": "2.13.0", "megatron-core": "0.19.2", "git_commit": "abc123"},
        outcomes=outcomes,
        skipped=["sequence parallel: the implementation declares sequence_parallel=False"],
        command="lora-harness verify --tp 2 --report-dir out",
        started="2025-01-01T00:00:00Z",
        seconds=123.4,
    )


EXPECTED = {
    ("forward_matches", L1): "pass", ("forward_matches", L2): "numeric",
    ("backward_matches", L1): "pass", ("backward_matches", L2): "pass",
    ("initial_adapters_match", L1): "pass", ("initial_adapters_match", L2): "hang",
    ("merge_matches", L1): "pass", ("merge_matches", L2): "crash",
    ("errors_follow_spec", L1): "contract", ("errors_follow_spec", L2): "advisory",
    ("sequence_parallel", L1): "skipped", ("sequence_parallel", L2): "skipped",
}


@pytest.fixture
def written(tmp_path: Path) -> dict[str, Path]:
    return write_report(make_results(), tmp_path / "out")


# ---------------------------------------------------------------- results.json


def test_results_json_is_strict_versioned_and_round_trips_verdicts(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    json.dumps(data, allow_nan=False)
    assert data["schema"] == "lora-harness-results" and data["schema_version"] == SCHEMA_VERSION
    assert {(c["property"], c["layout"]): c["verdict"] for c in data["cells"]} == EXPECTED
    minimal = next(c for c in data["cells"] if c["verdict"] == "numeric")["minimal_case"]
    assert GPTCase.from_json(minimal) == _case(seed=1)
    assert set(written) == {"json", "html", "markdown"} and all(p.parent == written["json"].parent for p in written.values())


def test_results_json_survives_non_finite_values(tmp_path: Path) -> None:
    results = make_results()
    rec = results.outcomes[0].records[0]
    rec.comparisons.append(_comparison(math.inf))  # a missing gradient: max_abs = inf
    rec.case["alpha"] = float("nan")  # a non-finite value results.py does not convert itself
    files = write_report(results, tmp_path)
    text = files["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["examples"][0]["worst_ratio"] == "inf" and data["examples"][0]["case"]["alpha"] == "nan"
    assert "12 ex · inf" in files["html"].read_text()


# ---------------------------------------------------------------- summary.md


def test_summary_has_counts_table_messages_and_replay(written: dict[str, Path]) -> None:
    md = written["markdown"].read_text()
    first = md.splitlines()[0]
    assert first == ("**lora-harness**: 5 passed, 4 failed (hang 1, crash 1, numeric 1, contract 1), "
                     "1 advisory, 2 skipped — impl lora.megatron")
    assert f"| property | `{L1}` | `{L2}` |" in md
    assert "| forward\\_matches | pass | **numeric** |" in md
    assert "| errors\\_follow\\_spec | **contract** | advisory |" in md
    assert REPLAY in md and "```sh" in md
    assert "max\\|diff\\|=" in md  # the first finding of the minimal example, escaped
    assert "SPEC requires ValueError" in md
    assert len(md.splitlines()) <= 60


def test_summary_of_a_big_run_is_truncated_with_a_note() -> None:
    outcomes = []
    for p in range(40):
        for l in range(10):
            v = Verdict.NUMERIC if (p + l) % 3 == 0 else Verdict.PASS
            outcomes.append(PropertyOutcome(f"prop_{p}", f"tp{l + 1}-ep1-etp{l + 1}-pp1", IMPL, v, examples=5,
                                            replay_command=f"lora-harness replay --property prop_{p}\nsecond line"))
    data = results_dict(RunResults(IMPL, {"contract": "strict"}, {}, outcomes))
    md = render_summary(data)
    lines = md.splitlines()
    assert len(lines) <= 62
    assert lines[0].startswith("**lora-harness**: 266 passed, 134 failed (numeric 134)")
    assert "Table truncated: 20 more properties and 4 more layouts" in md
    assert "more failing cells: see report.html" in md


def test_summary_of_a_clean_run() -> None:
    md = render_summary(results_dict(make_results(failing=False)))
    assert md.startswith("**lora-harness**: 9 passed, 0 failed, 1 advisory, 2 skipped — impl lora.megatron")
    assert "Failures" not in md


# ---------------------------------------------------------------- report.html


class _Matrix(HTMLParser):
    """Rows of table#matrix: [(row header, [(classes, text), ...]), ...] and the column headers."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # >0 inside table#matrix
        self.columns: list[str] = []
        self.rows: list[tuple[str, list[tuple[set[str], str]]]] = []
        self._in: str | None = None
        self._text = ""
        self._classes: set[str] = set()
        self._section = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "matrix":
            self.depth = 1
            return
        if not self.depth:
            return
        if tag == "table":
            self.depth += 1
        elif tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "tr" and self._section == "tbody":
            self.rows.append(("", []))
        elif tag in ("th", "td"):
            self._in, self._text, self._classes = tag, "", set((a.get("class") or "").split())

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag == "table":
            self.depth -= 1
        elif tag == self._in:
            text = " ".join(self._text.split())
            if self._section == "thead":
                self.columns.append(text)
            elif tag == "th":
                self.rows[-1] = (text, self.rows[-1][1])
            else:
                self.rows[-1][1].append((self._classes, text))
            self._in = None

    def handle_data(self, data):
        if self.depth and self._in:
            self._text += data


def _matrix(html_text: str) -> _Matrix:
    m = _Matrix()
    m.feed(html_text)
    return m


def test_html_matrix_has_a_row_per_property_and_a_coloured_cell_per_layout(written: dict[str, Path]) -> None:
    page = written["html"].read_text()
    m = _matrix(page)
    assert m.columns[1:] == LAYOUTS and m.columns[0].startswith("property")
    assert [name for name, _ in m.rows] == PROPS
    for prop, cells in m.rows:
        assert len(cells) == len(LAYOUTS)
        for layout, (classes, text) in zip(LAYOUTS, cells):
            verdict = EXPECTED[(prop, layout)]
            assert "cell" in classes and f"v-{verdict}" in classes, (prop, layout, classes)
            assert text.startswith(verdict), (prop, layout, text)
    # examples and the worst error relative to tolerance, 3.1e-04 style
    fwd = dict(zip(LAYOUTS, dict(m.rows)["forward_matches"]))
    assert "8 ex · 3.0e+06" in fwd[L2][1]
    assert "12 ex · " in fwd[L1][1] and "e-0" in fwd[L1][1]
    assert "no tensors compared" in dict(zip(LAYOUTS, dict(m.rows)["merge_matches"]))[L2][1]


def test_html_is_self_contained_escaped_and_shows_failures(written: dict[str, Path]) -> None:
    page = written["html"].read_text()
    for external in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert external not in page, external
    assert "<script" not in page
    # escaping: text from results never becomes markup
    assert "<b>not bold</b>" not in page and "&lt;b&gt;not bold&lt;/b&gt;" in page
    assert "output differs &lt;&amp;&gt;" in page
    # header: impl, contract, capabilities, skipped, totals
    assert "lora.megatron" in page and "<code>strict</code>" in page
    assert "sequence_parallel" in page and "the implementation declares sequence_parallel=False" in page
    assert "FAILED" in page
    # the plot: inline svg, one series per property with comparisons, a tolerance line
    assert page.count('<g class="series"') == 4  # forward, backward, initial_adapters, merge (tp1 examples)
    assert 'class="tol"' in page
    # the minimal failing example, pretty-printed, and the replay command in a <pre>
    assert "&quot;dim&quot;: 4" in page and "&quot;seed&quot;: 1" in page
    assert '<pre class="replay">' + REPLAY.replace("'", "&#x27;").replace('"', "&quot;") + "</pre>" in page
    assert 'id="cell-forward-matches--tp2-ep1-etp2-pp1"' in page
    assert 'id="environment"' in page and "megatron-core" in page and "abc123" in page


def test_clean_run_html_has_no_failures_section(tmp_path: Path) -> None:
    page = write_report(make_results(failing=False), tmp_path)["html"].read_text()
    assert "PASSED" in page and "<h2>Failures</h2>" not in page


# ---------------------------------------------------------------- check_writable


def test_check_writable_creates_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_writable(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone


def test_check_writable_names_the_path_when_it_cannot_be_used(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(OSError) as info:
            check_writable(bad)
        assert isinstance(info.value, ReportDirectoryError)
        assert str(bad) in str(info.value)
    with pytest.raises(ReportDirectoryError, match="file.txt/sub"):
        write_report(make_results(), blocker / "sub")


# ---------------------------------------------------------------- baseline


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(data))
    return d / "results.json"


def test_baseline_passing_to_failing_regresses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_report(make_results(failing=False), tmp_path / "old")["json"]
    new = write_report(make_results(failing=True), tmp_path / "new")["json"]
    assert baseline.main(["--baseline", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSED forward_matches {L2}: pass -> numeric" in out
    assert f"REGRESSED errors_follow_spec {L1}: pass -> contract" in out
    assert f"REGRESSED merge_matches {L2}: pass -> crash" in out
    assert out.strip().splitlines()[-1].startswith("REGRESSION: 4 regressed")


def test_baseline_identical_runs_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_report(make_results(), tmp_path / "old")["json"]
    new = write_report(make_results(), tmp_path / "new")["json"]
    # directories are accepted too
    assert baseline.main(["--baseline", str(old.parent), str(new.parent)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == ["no regression: 0 regressed, 0 grew, 0 fixed, 0 changed, 0 dropped, 12 unchanged"]


def test_baseline_fixed_changed_and_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = results_dict(make_results(failing=True))
    new = results_dict(make_results(failing=False))
    cell = next(c for c in new["cells"] if (c["property"], c["layout"]) == ("merge_matches", L2))
    cell["verdict"] = "hang"  # crash -> hang: failing in both, another kind
    drop = next(c for c in new["cells"] if (c["property"], c["layout"]) == ("backward_matches", L1))
    drop["verdict"] = "skipped"
    diff = baseline.compare(old, new)
    assert [(c.prop, c.layout) for c in diff.fixed] == [("forward_matches", L2), ("initial_adapters_match", L2), ("errors_follow_spec", L1)]
    assert [c.line() for c in diff.changed] == [f"CHANGED   merge_matches {L2}: crash -> hang"]
    assert [c.line() for c in diff.dropped] == [f"DROPPED   backward_matches {L1}: pass -> skipped"]
    assert not diff.has_regressions
    rc = baseline.main(["--baseline", str(_write(tmp_path, "old", old)), str(_write(tmp_path, "new", new))])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"FIXED     forward_matches {L2}: numeric -> pass" in out


def test_baseline_grew_needs_factor_10_and_ratio_above_0_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = results_dict(make_results(failing=False))
    new = json.loads(json.dumps(old))

    def set_ratio(data: dict, prop: str, layout: str, ratio: float, examples: int | None = None) -> None:
        cell = next(c for c in data["cells"] if (c["property"], c["layout"]) == (prop, layout))
        cell["worst_ratio"] = ratio
        if examples is not None:
            cell["examples"] = examples

    set_ratio(old, "forward_matches", L1, 1.2e-3)
    set_ratio(new, "forward_matches", L1, 3.4e-1)  # x283, above the floor: grew
    set_ratio(old, "backward_matches", L1, 1e-7)
    set_ratio(new, "backward_matches", L1, 5e-2)  # x500000 but below 0.1: noise
    set_ratio(old, "backward_matches", L2, 0.05)
    set_ratio(new, "backward_matches", L2, 0.45)  # x9 above the floor: not enough
    set_ratio(old, "merge_matches", L1, 0.0)
    set_ratio(new, "merge_matches", L1, 0.2, examples=50)  # from an exact 0
    diff = baseline.compare(old, new)
    assert [c.line() for c in diff.grew] == [
        f"GREW      forward_matches {L1} ratio 1.2e-03 -> 3.4e-01 (x283)",
        f"GREW      merge_matches {L1} ratio 0 -> 2.0e-01 (from 0) [examples 6 -> 50]",
    ]
    assert diff.has_regressions
    rc = baseline.main(["--baseline", str(_write(tmp_path, "old", old)), str(_write(tmp_path, "new", new))])
    assert rc == 1 and "GREW      forward_matches" in capsys.readouterr().out
    assert [c.prop for c in baseline.compare(old, new, growth_factor=1000).grew] == ["merge_matches"]


def test_baseline_bad_usage_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_report(make_results(), tmp_path / "good")["json"]
    not_json = tmp_path / "not.json"
    not_json.write_text("{oops")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    future = dict(json.loads(good.read_text()), schema_version=SCHEMA_VERSION + 1)
    future_path = tmp_path / "future.json"
    future_path.write_text(json.dumps(future))
    cases = {
        str(tmp_path / "missing.json"): "no such file",
        str(tmp_path): "no such file",  # a directory without results.json
        str(not_json): "not valid JSON",
        str(other): "is not a lora-harness results.json",
        str(future_path): f"schema version {SCHEMA_VERSION + 1}",
    }
    for bad, message in cases.items():
        for argv in (["--baseline", bad, str(good)], ["--baseline", str(good), bad]):
            assert baseline.main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("lora-harness report: ") and message in err[0], err
    assert baseline.main([str(good)]) == 2  # --baseline missing
    assert "--baseline" in capsys.readouterr().err
    with pytest.raises(baseline.BaselineError, match="schema version"):
        baseline.compare(json.loads(good.read_text()), future)


# ---------------------------------------------------------------- environment


def test_environment_has_versions_and_no_personal_data() -> None:
    env = collect_environment(IMPL)
    for key in ("impl", "impl_version", "python", "torch", "megatron-core", "hypothesis", "lora-harness",
                "git_commit", "platform", "cpu_count"):
        assert key in env
    assert env["impl"] == IMPL and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["lora-harness"] and env["torch"] and env["cpu_count"] >= 1
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    text = json.dumps(env)
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in text
    assert str(Path.home()) not in text or str(Path.home()) == "/"


def test_environment_does_not_import_megatron() -> None:
    code = ("import sys; from harness.report.environment import collect_environment; "
            "e = collect_environment('lora.megatron'); "
            "bad = [m for m in ('megatron', 'megatron.core', 'torch', 'lora') if m in sys.modules]; assert not bad, bad; "
            "assert e['megatron-core'], e; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_environment_without_git_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert collect_environment("no_such_module_xyz")["git_commit"] is None
    assert collect_environment("no_such_module_xyz")["impl_version"] is None


# ---------------------------------------------------------------- headless browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("chromium is not on PATH under CI=true; ci/setup.sh installs it (apt-get install chromium)")
    pytest.skip("chromium (or chromium-browser) is not on PATH; install it to render report.html headless (CI does)")


def _run_chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_report_renders_in_headless_chromium(written: dict[str, Path], tmp_path: Path) -> None:
    binary = _chromium()
    url = written["html"].resolve().as_uri()
    proc = _run_chromium(binary, tmp_path, "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    m = _matrix(dom)
    assert m.columns[1:] == LAYOUTS and m.columns[0].startswith("property") and [name for name, _ in m.rows] == PROPS
    texts = {(p, l): text for p, cells in m.rows for l, (_, text) in zip(LAYOUTS, cells)}
    for key, verdict in EXPECTED.items():
        assert texts[key].startswith(verdict), (key, texts[key])
    assert "8 ex · 3.0e+06" in texts[("forward_matches", L2)]
    assert "<svg" in dom and "tolerance (err/tol = 1)" in dom

    shot = tmp_path / "report.png"
    proc = _run_chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000, shot.stat().st_size if shot.exists() else None
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
