"""adapters_switch_off: both correct LoRAs pass it, each wrong switch is caught by the designed examples, missing API is a contract finding."""

import pytest
import torch
from hypothesis import settings

from harness.design import designed_rows
from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.properties import get_property
from harness.results import Verdict
from harness.tasks.switch import STEPS, switch_evidence

TP2 = ParallelLayout(tp=2)
MOE = ParallelLayout(tp=1, ep=2)
# The designed examples (what every run executes before its draws) and one draw.
DESIGNED_ONLY = settings(max_examples=1, database=None, deadline=None)
PROP = "adapters_switch_off"


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


def _outcome(impl, layout=TP2, family="gpt"):
    return check_property(PROP, layout, impl, settings=DESIGNED_ONLY, family=family, seed=5, shrink_budget=2)


def _failures(outcome):
    record = next(r for r in reversed(outcome.records) if r.verdict.failing)
    return {f.check for f in record.findings if f.verdict.failing}


def test_the_reference_passes_at_world_size_one():
    outcome = check_property(PROP, ParallelLayout(), "lora.reference", settings=DESIGNED_ONLY, seed=5)
    assert outcome.verdict is Verdict.PASS, outcome.error
    assert outcome.designed == len(designed_rows("gpt", ParallelLayout(), None, only=get_property(PROP).design_factors["gpt"]))
    hash(get_property(PROP))  # a Property stays hashable with its design_factors dict


def test_an_adapter_left_on_in_one_layer_is_numeric():
    outcome = _outcome("tests.wrong_impls.switch_leaves_first_layer_on")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert _failures(outcome) == {"switch_off"}
    assert "after `disable_adapter_layers(model)`" in outcome.error


def test_a_block_that_raises_leaving_adapters_off_is_caught():
    outcome = _outcome("tests.wrong_impls.switch_not_restored_on_error")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert _failures(outcome) == {"switch_on"}
    assert "whose body raised" in outcome.error


def test_expert_adapters_left_on_are_caught_in_the_moe_family_only():
    outcome = _outcome("tests.wrong_impls.switch_skips_experts", MOE, "moe")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert outcome.minimal_case.family == "moe"
    # Dense models have no expert adapters: the same implementation passes there.
    assert _outcome("tests.wrong_impls.switch_skips_experts", TP2).verdict is Verdict.PASS


def test_missing_switch_methods_are_a_contract_finding_unless_declared():
    outcome = _outcome("tests.wrong_impls.switch_missing")
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert "has no enable_adapter_layers, disable_adapter_layers, disable_adapter" in outcome.error
    declared = _outcome("tests.impls.no_switch")
    assert declared.verdict is Verdict.SKIPPED and "adapter_switch" in declared.skipped_reason


class _Peft:
    """A switch on a toy model: ``wrong`` names a step that misbehaves."""

    def __init__(self, model, wrong=None):
        self.model, self.wrong = model, wrong

    def disable_adapter_layers(self, model):
        model.on = False

    def enable_adapter_layers(self, model):
        model.on = self.wrong != "enable_adapter_layers"

    def disable_adapter(self, model):
        import contextlib

        @contextlib.contextmanager
        def block():
            model.on = False
            yield
            if self.wrong == "grow":
                model.extra = torch.nn.Linear(1, 1)
            model.on = True
        return block()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(3, 2)
        self.on = True

    def forward(self, x):
        return self.base(x) + (1.0 if self.on else 0.0)


def test_switch_evidence_records_each_step_and_what_changed():
    model = _Toy()
    x = torch.ones(1, 3)
    base = model.base(x).detach().double()
    good = switch_evidence(_Peft(model), model, lambda m: m(x), base)
    assert set(good.steps) == set(STEPS) and not good.changed and not good.tree_changed and good.error is None
    for step, (_, on) in STEPS.items():
        want = good.adapted if on else base
        # The raising block is left on (no finally): its step reads off.
        if step != "after a raising block":
            assert torch.equal(good.steps[step], want), step
    assert torch.equal(good.steps["after a raising block"], base)
    stuck = _Toy()
    stuck_base = stuck.base(x).detach().double()
    off = switch_evidence(_Peft(stuck, "enable_adapter_layers"), stuck, lambda mm: mm(x), stuck_base)
    assert torch.equal(off.steps["enable_adapter_layers"], stuck_base)  # what the property then charges
    m2 = _Toy()
    grown = switch_evidence(_Peft(m2, "grow"), m2, lambda mm: mm(x), base)
    assert grown.tree_changed and "extra.weight" in grown.changed

    class Partial:
        disable_adapter_layers = enable_adapter_layers = None

    assert switch_evidence(Partial(), _Toy(), lambda mm: mm(x), base).missing == (
        "enable_adapter_layers", "disable_adapter_layers", "disable_adapter")
