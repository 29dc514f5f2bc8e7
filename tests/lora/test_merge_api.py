"""merge_matches judges the LoRAMerge an implementation offers: SPEC's, Megatron-Bridge 0.6.2's, or one without TP arguments."""

import pytest
from hypothesis import settings

from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.results import Verdict
from harness.tasks.merge import merge_api

TP2 = ParallelLayout(tp=2)
RUN = settings(max_examples=4, database=None, deadline=None)


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


def test_the_signature_decides_how_merge_is_called():
    from lora.megatron import LoRAMerge
    from tests.impls.merge_tensor_helper import LoRAMerge as BridgeStyle
    from tests.wrong_impls.merge_without_tp_arguments import LoRAMerge as Plain

    assert merge_api(LoRAMerge()) == "contract"
    assert merge_api(BridgeStyle()) == "group"
    assert merge_api(Plain()) == "plain"
    assert merge_api(object()) == "none"


def test_a_bridge_style_tensor_helper_is_judged_by_its_own_merge():
    """Under the bridge contract: numerically right, and the missing model-level fold is advisory only."""
    outcome = check_property("merge_matches", TP2, "tests.impls.merge_tensor_helper", settings=RUN, seed=2, designed=False)
    assert outcome.verdict is Verdict.ADVISORY, outcome.error
    assert "not callable" in outcome.error
    checked = [c for r in outcome.records for c in r.comparisons]
    assert checked and all(c.passed for c in checked)


def test_the_same_helper_judged_strictly_misses_the_model_level_fold():
    from harness.contract import capabilities_of

    caps = capabilities_of("tests.impls.merge_tensor_helper").with_contract("strict")
    outcome = check_property("merge_matches", TP2, "tests.impls.merge_tensor_helper", settings=RUN, seed=2, capabilities=caps, designed=False)
    assert outcome.verdict is Verdict.CONTRACT and "model-level helper" in outcome.error


def test_a_merge_without_tp_arguments_is_one_api_finding_at_tp2_not_a_crash():
    outcome = check_property("merge_matches", TP2, "tests.wrong_impls.merge_without_tp_arguments", settings=RUN, seed=2,
                             shrink_budget=2, designed=False)
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert "cannot merge a shard at TP=2" in outcome.error
