"""Model families are first-class: a new one is one folder and one ``register`` call.

``tests/families/toy`` is the README's worked example ("Adding a model
family"): the dense GPTModel under another name, with its own case type,
layout set and designed features, and ``forward_matches`` opted in. These
tests show that registering it is all it takes for the run plan, the
layouts command, the case JSON round trip, the designed examples and a
real property check to include it.
"""

from __future__ import annotations

import pytest

from harness.families import family_names, get_family, register


@pytest.fixture(scope="module")
def toy():
    """The toy family, registered for this module's tests only (other tests list every family)."""
    import harness.families as registry
    import tests.families.toy as toy_family

    register(toy_family.FAMILY)
    yield toy_family.FAMILY
    registry._REGISTRY.pop("toy", None)


def test_the_builtin_families_are_registered_in_order():
    assert family_names()[:3] == ("gpt", "moe", "vlm")
    for name in ("gpt", "moe", "vlm"):
        family = get_family(name)
        assert family.case_type.family == name
        assert family.layouts(2, 2) and family.task is not None
    with pytest.raises(ValueError, match="unknown family 'nope'; known: gpt, moe, vlm"):
        get_family("nope")


def test_a_second_different_registration_is_refused(toy):
    import dataclasses

    assert register(toy) is toy  # the same record again: fine
    with pytest.raises(ValueError, match="a family named 'toy' is already registered"):
        register(dataclasses.replace(toy, example_share=1.0))
    with pytest.raises(TypeError, match="register\\(\\) takes a harness.families.Family"):
        register("toy")  # type: ignore[arg-type]


def test_the_plan_and_the_layouts_command_include_a_registered_family(toy, capsys):
    from harness.cli import main
    from harness.plan import Plan

    plan = Plan(2, 2, families=["toy"])
    assert [str(layout) for layout in plan.layouts["toy"]] == ["tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1"]
    cells = plan.cells()
    assert [c.prop.name for c in cells] == ["forward_matches", "forward_matches"]
    assert cells[0].test_id == "toy-forward_matches-tp2-ep1-etp2-pp1" and cells[0].name == "toy:tp2-ep1-etp2-pp1"
    assert plan.settings_for("toy").max_examples == 1
    assert main(["layouts", "--tp", "2"]) == 0
    assert "toy  tp2-ep1-etp2-pp1  world 2" in capsys.readouterr().out


def test_a_registered_familys_cases_round_trip_and_its_design_covers_its_pairs(toy):
    from hypothesis import given, settings

    from harness.cases import case_from_json
    from harness.design import designed_rows
    from harness.layouts import ParallelLayout

    layout = ParallelLayout(tp=2)
    rows = designed_rows("toy", layout)
    assert {(r["gated"], r["bias"]) for r in rows} == {(True, False), (True, True), (False, False), (False, True)}

    @settings(max_examples=5, database=None)
    @given(toy.strategy(layout, row=rows[1]))
    def round_trip(case):
        assert type(case).__name__ == "ToyCase" and case.family == "toy"
        assert (case.shape.gated_linear_unit, case.shape.add_bias_linear) == (rows[1]["gated"], rows[1]["bias"])
        assert case_from_json(case.to_json()) == case

    round_trip()


def test_a_registered_family_runs_a_property_check_on_ranks(toy):
    from hypothesis import settings

    from harness.driver import check_property
    from harness.layouts import ParallelLayout
    from harness.results import Verdict
    from harness.runs import Executor

    executor = Executor()
    outcome = check_property("forward_matches", ParallelLayout(tp=2), family="toy", settings=settings(max_examples=1),
                             executor=executor, seed=3)
    assert outcome.verdict is Verdict.PASS, outcome.error
    assert outcome.layout == "toy:tp2-ep1-etp2-pp1" and outcome.designed == 4 and outcome.examples >= 5
    skipped = check_property("backward_matches", ParallelLayout(tp=2), family="toy", executor=executor)
    assert skipped.verdict is Verdict.SKIPPED and "does not apply to the toy family" in skipped.skipped_reason
