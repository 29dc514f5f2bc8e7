"""The run plan (``harness.plan``): the one place that says what a run checks, in what order, with
which budgets and seeds; the CLI, the pytest plugin and torchrun read it."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings

from harness.layouts import ParallelLayout
from harness.plan import Plan, PlanError, layout_seed
from harness.properties import registry


def test_cells_cover_every_family_layout_and_property_once_in_run_order():
    plan = Plan(2, 2, seed=7)
    cells = plan.cells()
    keys = [(c.family.name, str(c.layout), c.prop.name) for c in cells]
    assert len(keys) == len(set(keys)) == 172
    want = {(f, str(layout), name) for f, ls in plan.layouts.items() for layout in ls
            for name, prop in registry().items() if f in prop.families}
    assert set(keys) == want
    # The most parallel dense layout first, with the property that reads only the shared runs.
    assert (cells[0].family.name, str(cells[0].layout), cells[0].prop.name) == ("gpt", "tp2-ep1-etp2-pp1-sp", "forward_matches")
    assert cells[0].test_id == "forward_matches-tp2-ep1-etp2-pp1-sp" and cells[0].name == "tp2-ep1-etp2-pp1-sp"
    moe = next(c for c in cells if c.family.name == "moe")
    assert moe.test_id.startswith("moe-") and moe.name.startswith("moe:") and moe.group == f"lora-moe-{moe.layout}"
    # Layouts of one rank run last.
    worlds = [c.layout.min_world_size for c in cells]
    assert all(w == 1 for w in worlds[worlds.index(1):])


def test_example_budgets_follow_the_profile_and_each_familys_share():
    fast, deep = settings(max_examples=1), settings(max_examples=250)
    for base, want in ((fast, {"gpt": 1, "moe": 1, "vlm": 1}), (deep, {"gpt": 250, "moe": 125, "vlm": 50})):
        plan = Plan(2, 2, settings=base)
        assert {f: plan.settings_for(f).max_examples for f in ("gpt", "moe", "vlm")} == want
    fixed = Plan(2, 2, settings=deep, examples=3)
    assert {fixed.settings_for(f).max_examples for f in ("gpt", "moe", "vlm")} == {3}
    # A heavy property draws its share of the family's examples (never fewer than one).
    heavy = registry()["recompute_transparent"]
    assert heavy.example_share == 0.2
    assert Plan(2, 2, settings=deep).settings_for("gpt", heavy).max_examples == 50
    assert Plan(2, 2, settings=deep).settings_for("moe", heavy).max_examples == 25
    assert Plan(2, 2, settings=fast).settings_for("moe", heavy).max_examples == 1


def test_seeds_are_kept_or_drawn_and_differ_by_layout_and_family():
    assert Plan(2, 1, seed=11).seed == 11
    assert 0 <= Plan(2, 1).seed < 2**32
    tp2 = ParallelLayout(tp=2)
    # The dense family's seeds are what they were before families had records (stored runs replay alike).
    assert layout_seed(5, tp2) == int.from_bytes(hashlib.sha256(f"5|{tp2.describe()}".encode()).digest()[:4], "big")
    assert len({layout_seed(5, tp2), layout_seed(5, tp2, "moe"), layout_seed(5, ParallelLayout()), layout_seed(6, tp2)}) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=3), "--tp 3: the layout set runs every power of two"),
    (dict(families=["gpt", "nope"]), "unknown --family nope; known: gpt, moe, vlm"),
    (dict(properties=["forward_matches", "nope"]), "unknown --property nope; known: forward_matches"),
    (dict(layouts=["tp4"]), "--layout tp4 is not in the set of --tp 2 --ep 1"),
    (dict(layouts=["tp2-x"]), "--layout tp2-x: cannot parse layout"),
    (dict(examples=0), "--examples 0: must be an integer >= 1"),
    (dict(seed=-1), "--seed -1: must be an integer from 0"),
])
def test_a_plan_that_cannot_be_made_says_which_flag_value_and_rule(kwargs, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Plan(**{"tp": 2, **kwargs})


def test_restricting_a_plan_keeps_only_what_was_asked_for():
    plan = Plan(2, 2, families=["moe"], properties=["forward_matches", "backward_matches"], layouts=["tp2-sp"])
    assert list(plan.layouts) == ["moe"] and [str(x) for x in plan.layouts["moe"]] == ["tp2-ep1-etp2-pp1-sp"]
    assert [c.prop.name for c in plan.cells()] == ["forward_matches", "backward_matches"]
    assert plan.header() == ["moe layouts: tp2-ep1-etp2-pp1-sp", f"seed {plan.seed} (--seed {plan.seed} draws the same examples again)"]
