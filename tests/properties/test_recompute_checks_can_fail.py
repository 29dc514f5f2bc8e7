"""recompute_transparent: the reference passes it (lora.megatron: tests/properties/test_properties.py), each wrong recompute handling is caught by the designed
examples with the gradients it loses named, and an implementation that declares no recompute is skipped."""

import pytest
import torch
from hypothesis import settings

from harness.design import designed_rows
from harness.driver import check_property
from harness.evidence import RecomputeRun
from harness.layouts import ParallelLayout
from harness.properties import get_property
from harness.results import Verdict
from harness.tasks import recompute as recompute_task
from harness.tasks.recompute import SETTINGS

TP2 = ParallelLayout(tp=2)
MOE = ParallelLayout(tp=1, ep=2)
DESIGNED_ONLY = settings(max_examples=1, database=None, deadline=None)
PROP = "recompute_transparent"


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


def _outcome(impl, layout=TP2, family="gpt"):
    return check_property(PROP, layout, impl, settings=DESIGNED_ONLY, family=family, seed=5, shrink_budget=2)


def _failures(outcome):
    record = next(r for r in reversed(outcome.records) if r.verdict.failing)
    return {f.check for f in record.findings if f.verdict.failing}


def test_the_reference_passes_at_world_size_one_on_every_designed_example():
    outcome = check_property(PROP, ParallelLayout(), "lora.reference", settings=DESIGNED_ONLY, seed=5)
    assert outcome.verdict is Verdict.PASS, outcome.error
    assert outcome.designed == len(designed_rows("gpt", ParallelLayout(), None, only=get_property(PROP).design_factors["gpt"]))


def test_a_frozen_input_to_the_checkpoint_loses_the_gradients():
    outcome = _outcome("tests.wrong_impls.recompute_frozen_input")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    # Full recompute of every layer: the loss has no grad_fn (backward raises); of the first layer only,
    # its adapters get none. The minimal case keeps one of the two.
    assert _failures(outcome) & {"recompute_runs", "recompute_gradient_lost"}, outcome.error
    assert "under recompute (full" in outcome.error


def test_a_fix_for_full_recompute_only_is_caught_under_selective_recompute():
    outcome = _outcome("tests.wrong_impls.recompute_full_only")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert "selective: mlp" in outcome.error
    # Exclude mode leaves the attention alone: nothing upstream of the first MLP trains.
    assert outcome.minimal_case.lora["exclude_modules"] == ["linear_qkv", "linear_proj"]
    moe = _outcome("tests.wrong_impls.recompute_full_only", MOE, "moe")
    assert moe.verdict is Verdict.NUMERIC and "selective: moe" in moe.error, moe.error


def test_a_nested_rng_fork_that_rewinds_the_default_stream_under_recompute_is_caught():
    # Only under sequence parallelism (megatron's block forks the stream) and with expert adapters
    # dropping after a dense adapter's dropout in the same layer: designed rows with dropout on.
    outcome = _outcome("tests.wrong_impls.recompute_nested_fork", ParallelLayout(tp=2, sp=True), "moe")
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert "recompute_gradient" in _failures(outcome), outcome.error
    assert "experts" in outcome.error
    assert outcome.minimal_case.lora["dropout"] > 0


def test_an_implementation_that_declares_no_recompute_is_skipped():
    declared = _outcome("tests.impls.no_recompute")
    assert declared.verdict is Verdict.SKIPPED and "recompute" in declared.skipped_reason


def test_every_setting_runs_until_one_raises():
    calls = []

    def run(overrides):
        calls.append(overrides)
        if overrides.get("recompute_granularity") == "full":
            raise RuntimeError("element 0 of tensors does not require grad")
        return torch.zeros(2), {"a": torch.ones(1)}

    import harness.tasks.recompute as mod
    original = mod.any_rank
    mod.any_rank = lambda flag: flag  # one rank: no collective
    try:
        ev = recompute_task.recompute_evidence("gpt", run)
    finally:
        mod.any_rank = original
    names = list(SETTINGS["gpt"])
    # The first setting raised: the next is not run.
    assert calls[0] == {} and len(calls) == 2 and list(ev.runs) == names[:1]
    assert ev.runs[names[0]].error == "RuntimeError: element 0 of tensors does not require grad"
    assert isinstance(ev.plain, RecomputeRun) and torch.equal(ev.plain.grads["a"], torch.ones(1))


def test_a_biased_model_leaves_out_only_what_megatron_core_cannot_recompute():
    """Selective MLP recompute of a biased MLP does not return in megatron-core 0.19, without any LoRA:
    that setting is left out and named, the full recompute settings still run."""
    from types import SimpleNamespace

    import harness.tasks.recompute as mod

    def run(overrides):
        return torch.zeros(2), {"a": torch.ones(1)}

    original = mod.any_rank
    mod.any_rank = lambda flag: flag  # one rank: no collective
    try:
        biased = SimpleNamespace(shape=SimpleNamespace(add_bias_linear=True))
        ev = recompute_task.recompute_evidence("gpt", run, biased)
        plain = recompute_task.recompute_evidence("gpt", run, SimpleNamespace(shape=SimpleNamespace(add_bias_linear=False)))
    finally:
        mod.any_rank = original
    names = list(SETTINGS["gpt"])
    assert list(ev.left_out) == ["selective: mlp, core_attn"] and "does not return" in ev.left_out["selective: mlp, core_attn"]
    assert list(ev.runs) == [n for n in names if n not in ev.left_out]
    assert list(plain.runs) == names and plain.left_out == {}
    # MoE's selective setting recomputes the MoE layer, not an MLP: nothing left out.
    assert recompute_task.settings_not_run("moe", SimpleNamespace(shape=SimpleNamespace(add_bias_linear=True))) == {}


def test_backward_is_agreed_by_every_rank_before_it_starts():
    import harness.tasks.recompute as mod
    original = mod.any_rank
    mod.any_rank = lambda flag: flag  # one rank: no collective
    try:
        leaf = torch.ones(3, requires_grad=True)
        out = leaf * 2
        mod.probe_backward(out, torch.full((3,), 0.5))
        assert torch.equal(leaf.grad, torch.ones(3))
        with pytest.raises(RuntimeError, match="no grad_fn on this rank"):
            mod.probe_backward(torch.ones(3), torch.ones(3))
        mod.any_rank = lambda flag: True  # another rank's logits have none
        with pytest.raises(RuntimeError, match="no grad_fn on another rank"):
            mod.probe_backward(leaf * 2, torch.ones(3))
    finally:
        mod.any_rank = original
