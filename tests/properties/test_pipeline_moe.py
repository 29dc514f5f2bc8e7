"""The MoE family at a pipeline layout (harness.families.moe.pipeline): an expert layer in every stage, EP groups
inside each stage, megatron-core's schedule; the checks fail for pipeline and expert bugs there."""

import functools

import pytest
import torch

from harness.families.moe.case import MoECase
from harness.families.moe.model import MoEShape
from harness.layouts import ParallelLayout
from harness.results import Verdict

EP2_PP2 = ParallelLayout(ep=2, pp=2)


@pytest.fixture(autouse=True)
def _ep2(max_ep):
    if max_ep < 2:
        pytest.skip("needs --ep 2 (the layout is tp1-ep2-pp2, world 4)")


def _case(impl="lora.megatron", layout=EP2_PP2, grouped=True, share=True, training=True):
    shape = MoEShape(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=2,
                     vocab_size=4, seq_length=8, micro_batch_size=1, num_experts=4, moe_router_topk=2,
                     moe_ffn_hidden_size=4, grouped=grouped, dispatcher="alltoall")
    lora = dict(dim=2, alpha=4, target_modules=["*.experts.*linear_fc1", "*.layers.0.*linear_fc2"], exclude_modules=[],
                share_expert_adapters=share)
    return MoECase(shape=shape, lora=lora, seed=7, layout=layout, impl=impl, model_dtype=torch.float64,
                   training=training)


@functools.lru_cache(maxsize=1)
def _executor():
    from harness.runs import Executor

    return Executor()


def _check(prop, case):
    from harness.properties import get_property
    from harness.runs import Evidence

    return get_property(prop).check(Evidence(_executor(), case))


@pytest.mark.parametrize("grouped, share", [(True, True), (True, False), (False, True)],
                         ids=["grouped-shared", "grouped-per-expert", "sequential"])
def test_lora_megatron_through_megatron_s_schedule_matches_the_reference_at_ep2_pp2(grouped, share):
    """Each stage's experts over EP=2: logits from the last stage, the input gradient from the first, every
    expert adapter's gradient by global expert and layer, the merge, the shared adapter equal over EP and the
    logits equal to EP=1's (tp1-pp2)."""
    case = _case(grouped=grouped, share=share)
    for prop in ("forward_matches", "backward_matches", "adapters_follow_spec", "merge_matches",
                 "shared_expert_adapters_identical", "ep_size_independent"):
        result = _check(prop, case)
        assert result.verdict is Verdict.PASS, (prop, result.findings)
    bwd = _check("backward_matches", case)
    # Layer 0's fc2 (routed, shared only when grouped-shared) and both layers' fc1: pieces from both stages.
    params = {c.location.param for c in bwd.comparisons if c.location.param}
    assert any(".layers.1.mlp.experts." in p for p in params), params
    assert any(".layers.0.mlp.experts." in p and "linear_fc2" in p for p in params), params


def test_stage_local_pattern_matching_is_caught_in_an_moe_pipeline():
    """``*.layers.0.*linear_fc2`` matched per stage adapts layer 1's expert fc2 as well."""
    case = _case(impl="tests.wrong_impls.pp_stage_local_names")
    assert _check("forward_matches", case).verdict.failing
    named = _check("adapters_follow_spec", case)
    assert named.verdict is Verdict.CONTRACT
    assert any(f.check == "stage_local_names" and "decoder.layers.1.mlp.experts" in f.message for f in named.findings)


def test_a_shared_expert_adapter_not_summed_over_ep_drifts_inside_a_stage():
    result = _check("shared_expert_adapters_identical", _case(impl="tests.wrong_impls.shared_expert_grad_not_summed"))
    assert result.verdict.failing
    assert any("differs after one optimizer step" in f.message for f in result.findings)


def test_expert_adapters_saved_by_stages_load_without_them_at_another_ep_and_etp():
    """Saved at tp1-ep2-pp2, loaded at tp2-sp (EP 2 -> 1, ETP 1 -> 2, no stages): bit for bit; per-expert
    adapters saved at their local index lose EP rank 1's experts there too."""
    load = ParallelLayout(tp=2, sp=True)
    for grouped, share in ((True, False), (False, True)):
        result = _check("checkpoint_roundtrip", _case(grouped=grouped, share=share).with_(load_layout=load))
        assert result.verdict is Verdict.PASS, result.findings
        assert any(c.location.param and ".layers.1.mlp.experts." in c.location.param for c in result.comparisons)
    wrong = _check("checkpoint_roundtrip", _case(impl="tests.wrong_impls.ckpt_experts_local_index", share=False)
                   .with_(load_layout=load))
    assert wrong.verdict is Verdict.CONTRACT and "checkpoint_keys" in {f.check for f in wrong.findings}


def test_switching_errors_and_recompute_run_on_every_moe_stage():
    case = _case(training=False)
    for prop in ("adapters_switch_off", "errors_follow_spec", "recompute_transparent"):
        assert _check(prop, case).verdict is Verdict.PASS, prop
    # A switch that leaves the expert adapters on is caught through the schedule.
    assert _check("adapters_switch_off", _case(impl="tests.wrong_impls.switch_skips_experts")).verdict.failing
