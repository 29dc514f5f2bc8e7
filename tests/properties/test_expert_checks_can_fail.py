"""Every MoE property can fail: wrong expert implementations are caught with a shrunk example.

Each implementation in ``tests.wrong_impls`` named ``expert_*`` / ``shared_expert_*``
carries one expert-parallel bug reported in the field (Megatron-Bridge
issues and PRs, 2025-2026). For each we assert which property catches it at
which layout, that the report carries the shrunk example, and where the bug
needs a particular layout, that the same code passes where it cannot show.
"""

import re

import pytest
from hypothesis import settings

from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.results import Verdict

# ETP=2 inside TP=2; ETP=1 inside TP=2 (ETP != TP); EP=2 at TP=1.
ETP2 = ParallelLayout(tp=2, etp=2, sp=True)
ETP1 = ParallelLayout(tp=2, etp=1, sp=True)
EP2 = ParallelLayout(ep=2)
WORLD1 = ParallelLayout()
# MoE examples cost more than dense ones; the triggers (an expert adapter,
# grouped experts with a shared adapter) are common draws.
# Fixed draws: what is asserted about the shrunk case must not depend on luck.
SEED = 20261201
# Shrinking runs after the first failure: enough for what these tests assert
# about the shrunk case (one layer, a gated MLP, ...), and CI minutes.
SHRINK = 4
SEARCH = settings(max_examples=20, database=None, deadline=None)


@pytest.fixture(autouse=True)
def _needs_tp2_ep2(max_tp, max_ep):
    if max_tp < 2 or max_ep < 2:
        pytest.skip("needs --tp 2 --ep 2")


def _expect_failure(prop, impl, layout):
    outcome = check_property(prop, layout, impl, settings=SEARCH, family="moe", seed=SEED, shrink_budget=SHRINK, designed=False)
    assert outcome.verdict.failing, f"{prop} did not charge {impl} at {layout}: {outcome.verdict.value} {outcome.error}"
    assert re.search(r"Falsifying example|Failing test case", outcome.falsifying_example)
    assert "--case-json" in outcome.replay_command and '\\"family\\": \\"moe\\"' not in outcome.replay_command
    case = outcome.minimal_case
    assert case is not None and case.family == "moe" and case.impl == impl and case.layout == layout
    return outcome


def _expect_pass(prop, impl, layout, examples=4):
    outcome = check_property(prop, layout, impl, settings=settings(SEARCH, max_examples=examples), family="moe", seed=SEED, designed=False)
    assert outcome.passed, outcome.error
    return outcome


def test_forward_catches_an_fc2_delta_counted_once_per_expert_tp_rank():
    impl = "tests.wrong_impls.expert_fc2_full_per_etp_rank"
    outcome = _expect_failure("forward_matches", impl, ETP2)
    assert outcome.verdict is Verdict.NUMERIC
    targets = outcome.minimal_case.lora["target_modules"] or ["(exclude mode)"]
    assert any("fc2" in t or t in ("(exclude mode)",) for t in targets), targets
    _expect_pass("forward_matches", impl, ETP1)  # one ETP rank: nothing to count twice


def test_backward_catches_an_expert_gradient_missing_its_expert_tp_sum():
    impl = "tests.wrong_impls.expert_fc1_grad_not_reduced"
    _expect_pass("forward_matches", impl, ETP2)  # the forward is exact
    outcome = _expect_failure("backward_matches", impl, ETP2)
    assert re.search(r"gradient of \S+experts\.\S+adapter\.linear_in\.weight", outcome.error), outcome.error


def test_expert_adapters_on_the_dense_tp_group_are_caught_where_etp_differs():
    impl = "tests.wrong_impls.expert_on_dense_tp_group"
    outcome = _expect_failure("forward_matches", impl, ETP1)
    assert "ETP rank" in outcome.error and "SPEC expects" in outcome.error
    assert outcome.verdict is Verdict.CONTRACT
    _expect_pass("forward_matches", impl, ETP2)  # the groups coincide there


def test_shared_adapter_initialised_per_ep_rank_is_caught():
    impl = "tests.wrong_impls.shared_expert_init_per_ep_rank"
    outcome = _expect_failure("shared_expert_adapters_identical", impl, EP2)
    assert "differs after creation" in outcome.error
    case = outcome.minimal_case
    assert case.shape.grouped and case.lora["share_expert_adapters"]


def test_shared_adapter_gradient_not_summed_over_ep_is_caught():
    impl = "tests.wrong_impls.shared_expert_grad_not_summed"
    outcome = _expect_failure("shared_expert_adapters_identical", impl, EP2)
    assert "differs after one optimizer step" in outcome.error
    _expect_pass("backward_matches", impl, WORLD1)  # one EP rank: nothing to sum


def test_ep_size_independence_catches_a_shared_gradient_not_summed_over_ep():
    impl = "tests.wrong_impls.shared_expert_grad_not_summed"
    outcome = _expect_failure("ep_size_independent", impl, EP2)
    assert "output after one optimizer step" in outcome.error


def test_expert_rank_not_normalised_is_caught():
    impl = "tests.wrong_impls.expert_rank_not_normalised"
    outcome = _expect_failure("forward_matches", impl, WORLD1)
    assert "moe_router_topk" in outcome.error and "SPEC expects" in outcome.error
    assert outcome.minimal_case.lora["normalize_moe_lora"]


def test_merge_catches_expert_deltas_dropped_by_the_fold():
    outcome = _expect_failure("merge_matches", "tests.wrong_impls.merge_drops_experts", EP2)
    assert "output of the merged model" in outcome.error


def test_init_distribution_catches_expert_adapters_that_ignore_the_init_method():
    impl = "tests.wrong_impls.expert_init_method_ignored"
    outcome = _expect_failure("init_follows_distribution", impl, WORLD1)
    assert outcome.verdict is Verdict.CONTRACT
    assert re.search(r"A of \S*experts\S*", outcome.error), outcome.error
    assert outcome.minimal_case.lora["lora_A_init_method"] != "kaiming"


def test_a_shared_expert_fc2_delta_counted_tp_times_under_overlap_is_caught(max_tp, max_ep):
    """Megatron-Bridge #6089's class: under moe_shared_expert_overlap the shared expert's fc2 returns
    partial sums reduced after it; an adapter adding its whole delta on every TP rank is summed TP times."""
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    layout = ParallelLayout(tp=2, ep=1, etp=1, sp=True)
    kw = dict(settings=settings(max_examples=1, database=None, deadline=None), family="moe", seed=5, shrink_budget=4)
    outcome = check_property("forward_matches", layout, "tests.wrong_impls.shared_overlap_fc2_times_tp", **kw)
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert outcome.minimal_case.shape.shared_expert_overlap
    assert check_property("forward_matches", layout, "lora.megatron", **kw).verdict is Verdict.PASS
