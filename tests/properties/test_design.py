"""Designed examples (harness.design): every pair of feature values at every layout, the same for every
implementation, and a failing designed example shrinks and is stored like a drawn one."""

import itertools
import json

import pytest
from hypothesis import given, settings

from harness.contract import Capabilities
from harness.design import coverage_of, designed_rows, factors, row_of_case, row_priority
from harness.families import get_family
from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.regressions import RegressionStore
from harness.families import family_names
from harness.settings import layout_set
from harness.strategies import cases_for

CAPS = {"strict": Capabilities(), "bridge": Capabilities.bridge(), "no-grouped": Capabilities(grouped_experts=False)}


def _cells():
    for family in family_names():
        for layout in layout_set(2, 2, family):
            yield family, layout


@pytest.mark.parametrize("caps_name", sorted(CAPS))
@pytest.mark.parametrize("family,lay", list(_cells()), ids=lambda v: str(v))
def test_every_feasible_pair_and_triple_appears(family, lay, caps_name):
    layout = lay
    """Checked by brute force over the whole product, apart from the greedy construction."""
    caps = CAPS[caps_name]
    fs = factors(family, layout, caps)
    rows = designed_rows(family, layout, caps)
    names = [f.name for f in fs]
    assert all(set(r) == set(names) for r in rows)
    assert all(get_family(family).design.valid(r) for r in rows), "a designed row breaks a rule of the exact comparisons"
    product = [dict(zip(names, values)) for values in itertools.product(*(f.levels for f in fs))]
    feasible = [r for r in product if get_family(family).design.valid(r)]
    interactions = list(itertools.combinations(names, 2)) + list(get_family(family).design.triples)
    for inter in interactions:
        want = {tuple(r[n] for n in inter) for r in feasible}
        got = {tuple(r[n] for n in inter) for r in rows}
        assert want <= got, f"{family} {layout} {caps_name}: {inter} misses {sorted(map(repr, want - got))[:3]}"
    # Each triple also in a row that does not train with dropout (where gradients are judged exactly).
    def steady(r):
        return r.get("dropout", "none") == "none" or not r.get("training", True)

    for inter in get_family(family).design.triples:
        want = {tuple(r[n] for n in inter) for r in feasible if steady(r)}
        got = {tuple(r[n] for n in inter) for r in rows if steady(r)}
        assert want <= got, f"{family} {layout} {caps_name}: {inter} without dropout misses {sorted(map(repr, want - got))[:3]}"
    # Run order: the most telling rows first (harness.design.row_priority).
    assert [row_priority(r) for r in rows] == sorted((row_priority(r) for r in rows), reverse=True)
    # Far fewer rows than the product, and every value of every feature appears.
    assert len(rows) <= 40 < len(feasible) or len(feasible) <= 40
    for f in fs:
        assert {repr(v) for v in f.levels} == {repr(r[f.name]) for r in rows}, f.name


def test_the_design_depends_on_declared_capabilities_only():
    layout = ParallelLayout(tp=2, ep=2, sp=True)
    assert designed_rows("moe", layout, Capabilities()) == designed_rows("moe", layout, Capabilities())
    assert designed_rows("moe", layout, Capabilities.bridge()) != designed_rows("moe", layout, Capabilities())
    no_grouped = designed_rows("moe", layout, CAPS["no-grouped"])
    assert {r["expert_kind"] for r in no_grouped} == {"sequential"}
    bridge = designed_rows("gpt", ParallelLayout(tp=2), Capabilities.bridge())
    assert {r["lora_dtype"] for r in bridge} == {None} and "xavier_uniform" not in {r["init"][0] for r in bridge}


@pytest.mark.parametrize("family,lay", [("gpt", ParallelLayout(tp=2, sp=True)), ("moe", ParallelLayout(tp=2, ep=2, sp=True)),
                                        ("vlm", ParallelLayout(tp=2))], ids=str)
def test_a_rows_case_has_the_rows_features(family, lay):
    layout = lay
    """The strategy honours every feature of every row: the case, read back, is the row."""
    rows = designed_rows(family, layout)
    cases = []
    for row in rows:
        @settings(max_examples=1, database=None)
        @given(cases_for(family, layout, "lora.megatron", None, row=row))
        def draw(case):
            cases.append(case)

        draw()
    for row, case in zip(rows, cases):
        case.validate()
        got = row_of_case(family, json.loads(json.dumps(case.to_json())))
        assert {k: got.get(k) for k in row} == row
    cov = coverage_of(family, layout, None, [c.to_json() for c in cases], len(rows))
    assert cov.pairs_run == cov.pairs and not cov.missing
    # Fewer examples cover fewer pairs, and the line names what was not run.
    partial = coverage_of(family, layout, None, [cases[0].to_json()], 1)
    assert partial.pairs_run < partial.pairs and "NOT exercised" in partial.line()


def test_dropout_rows_can_decide():
    """A designed dropout row has power: the elements the adapters see make (1-p)^n far below 1e-6."""
    row = next(r for r in designed_rows("gpt", ParallelLayout()) if r["dropout"] != "none" and r["training"])
    cases = []

    @settings(max_examples=1, database=None)
    @given(cases_for("gpt", ParallelLayout(), "lora.megatron", None, row=row))
    def draw(case):
        cases.append(case)

    draw()
    s = cases[0].shape
    assert cases[0].lora["dropout"] == 0.5
    assert s.seq_length * s.micro_batch_size * s.hidden_size >= 40  # one adapter's input alone: 0.5**40 ~ 1e-12


def test_a_combination_bug_is_caught_by_design_at_every_seed(tmp_path):
    """gate_up_swapped shows only with a gated MLP: the designed rows reach it whatever the seed, before any draw."""
    layout = ParallelLayout(tp=2)
    store = RegressionStore(str(tmp_path))
    for seed in (1, 2):
        outcome = check_property("forward_matches", layout, "tests.wrong_impls.gate_up_swapped",
                                 settings=settings(max_examples=1, database=None), seed=seed,
                                 regressions=store if seed == 1 else None)
        assert outcome.verdict.failing, outcome.summary_line()
        first_fail = next(r for r in outcome.records if r.verdict.failing)
        assert first_fail.source == "designed"
        assert outcome.minimal_case.shape.gated_linear_unit  # shrinking stays inside the row
        assert outcome.designed >= 1
    stored = list(store.cases("forward_matches", layout.describe()))
    assert stored and all(c.shape.gated_linear_unit for _, c in stored)


def test_an_expert_combination_bug_is_caught_by_design():
    """shared_expert_grad_not_summed needs grouped experts, one shared adapter, training, EP=2: a designed row has them."""
    layout = ParallelLayout(tp=1, ep=2)
    outcome = check_property("backward_matches", layout, "tests.wrong_impls.shared_expert_grad_not_summed",
                             settings=settings(max_examples=1, database=None), family="moe", seed=3, shrink_budget=2)
    assert outcome.verdict.failing, outcome.summary_line()
    case = outcome.minimal_case
    assert case.shape.grouped and case.lora["share_expert_adapters"] and case.training
    assert next(r for r in outcome.records if r.verdict.failing).source == "designed"


def test_cells_start_cheap_and_sensitive_and_a_layout_stays_in_one_worker():
    from harness.properties import registry
    from harness.plan import cell_order, lead_layouts, property_order
    from harness.pytest_plugin import cell_scope

    cells = [(f, lay) for f in family_names() for lay in layout_set(2, 2, f)]
    order = cell_order(cells)
    assert sorted(map(repr, order)) == sorted(map(repr, cells))
    lead = [("gpt", "tp2-ep1-etp2-pp1-sp"), ("moe", "tp2-ep2-etp1-pp1-sp"), ("moe", "tp2-ep2-etp2-pp1-sp"),
            ("vlm", "tp2-ep1-etp2-pp1"), ("gpt", "tp2-ep1-etp2-pp1")]
    assert [(f, lay.describe()) for f, lay in order[:5]] == lead
    assert [(f, lay.describe()) for f, lay in lead_layouts(cells)] == lead
    assert all(lay.min_world_size == 1 for _, lay in order[-3:])
    names = [n for n, _ in property_order(registry())]
    assert names[:2] == ["forward_matches", "backward_matches"]
    assert names.index("adapters_follow_spec") < names.index("init_matches_layouts")
    # Every property of a family and layout maps to one xdist scope; other tests to their own.
    assert cell_scope("t.py::test_lora[forward_matches-tp2-ep1-etp2-pp1-sp]") == \
        cell_scope("t.py::test_lora[init_follows_distribution-tp2-ep1-etp2-pp1-sp]") == "lora-gpt-tp2-ep1-etp2-pp1-sp"
    assert cell_scope("t.py::test_lora[moe-ep_size_independent-tp2-ep2-etp1-pp1-dp2-sp]") == "lora-moe-tp2-ep2-etp1-pp1-dp2-sp"
    assert cell_scope("t.py::test_lora[moe-forward_matches-tp2-ep1-etp2-pp1-sp]") != cell_scope(
        "t.py::test_lora[forward_matches-tp2-ep1-etp2-pp1-sp]")
    assert cell_scope("tests/test_x.py::test_y") == "tests/test_x.py::test_y"
    assert cell_scope("tests/test_x.py::test_y@lora-world4") == "lora-world4"


def test_a_qkv_layout_bug_is_caught_by_design():
    """qkv_blocked_order shows only with two query groups per TP rank: a designed feature since the
    detection benchmark found the designed set missed it (only a draw at another layout caught it)."""
    layout = ParallelLayout(tp=2, sp=True)
    outcome = check_property("forward_matches", layout, "tests.wrong_impls.qkv_blocked_order",
                             settings=settings(max_examples=1, database=None), seed=5, shrink_budget=2)
    assert outcome.verdict.failing, outcome.summary_line()
    assert next(r for r in outcome.records if r.verdict.failing).source == "designed"
    assert outcome.minimal_case.shape.num_query_groups == 2 * layout.tp


def test_a_property_that_reads_no_designed_feature_runs_drawn_examples_only():
    """errors_follow_spec's task tries its own bad inputs: it skips the designed rows, the others run them."""
    from harness.properties import get_property

    assert get_property("errors_follow_spec").designed is False
    assert get_property("forward_matches").designed is True
    outcome = check_property("errors_follow_spec", ParallelLayout(), "lora.megatron",
                             settings=settings(max_examples=1, database=None), seed=5)
    assert outcome.passed, outcome.summary_line()
    assert outcome.designed == 0 and {r.source for r in outcome.records} == {"drawn"}
