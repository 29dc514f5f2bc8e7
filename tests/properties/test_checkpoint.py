"""checkpoint_roundtrip (harness.properties.checkpoint): adapters saved with megatron-core's dist_checkpointing
at one layout load at another; the load layout travels in the case; the checks fail for the checkpoint bugs
of tests/wrong_impls."""

import pytest
import torch
from hypothesis import settings

from harness.cases import CaseError, case_from_json, check_case_json
from harness.checkpoint import load_layouts
from harness.driver import check_property
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape
from harness.layouts import ParallelLayout
from harness.results import Verdict
from lora.megatron.dense_adapters import per_layer_entry

DESIGNED_ONLY = settings(max_examples=1, database=None, deadline=None)
TP2 = ParallelLayout(tp=2)


def _case(layout=ParallelLayout(tp=1, ep=2), load=TP2, **shape):
    return GPTCase(shape=GPTShape(num_layers=2, **shape), lora=dict(dim=2, alpha=4), seed=3, layout=layout,
                   model_dtype=torch.float64, load_layout=load)


def test_the_load_layout_travels_in_the_case_json_and_a_case_without_one_keeps_its_old_form():
    case = _case()
    assert case_from_json(case.to_json()) == case and case.to_json()["load_layout"] == "tp2-ep1-etp2-pp1"
    assert "load_layout" not in case.with_(load_layout=None).to_json()


@pytest.mark.parametrize("value, needle", [(3, "must be null or a layout name"), ("tp3x", "tp3x")])
def test_a_bad_load_layout_is_one_clear_error(value, needle):
    data = _case().to_json()
    data["load_layout"] = value
    with pytest.raises(ValueError, match="load_layout"):
        check_case_json(data)
    with pytest.raises(ValueError, match=needle):
        check_case_json(data)


def test_a_model_the_load_layout_cannot_hold_is_refused_before_any_rank_starts():
    # One query group cannot be split over TP=2: fine where it is saved (TP=1), not where it would load.
    with pytest.raises(CaseError, match="load_layout tp2"):
        _case(num_query_groups=1, num_attention_heads=2).validate()
    _case(num_query_groups=1, num_attention_heads=2, load=ParallelLayout()).validate()


def test_every_saved_layout_loads_at_itself_and_another_tp_size():
    for x in (ParallelLayout(tp=2), ParallelLayout(tp=1, ep=2), ParallelLayout(tp=2, ep=2, sp=True)):
        ys = load_layouts("gpt", x)
        assert ys[0] == x and any(y.tp != x.tp for y in ys) and all(y.min_world_size <= x.min_world_size for y in ys)
    assert load_layouts("gpt", ParallelLayout()) == [ParallelLayout()]


def test_an_adapter_entry_in_a_transformer_block_is_keyed_by_its_global_layer():
    # The block passes its layer's global number as the leading offset and rewrites "decoder.layers.<i>.".
    assert per_layer_entry("decoder.layers.0.mlp.linear_fc1.adapter.", ((0, 5, 8),)) == \
        ("decoder.layers.0.5.mlp.linear_fc1.adapter.", ())
    assert per_layer_entry("output_layer.adapter.", ()) == ("output_layer.adapter.", ())
    nested = "language_model.decoder.layers.1.self_attention.linear_qkv.adapter."
    assert per_layer_entry(nested, ((0, 3, 4),))[0] == "language_model.decoder.layers.1.3.self_attention.linear_qkv.adapter."


def _outcome(impl, layout=TP2):
    return check_property("checkpoint_roundtrip", layout, impl, settings=DESIGNED_ONLY, family="gpt", seed=5,
                          shrink_budget=2)


def _failing_checks(outcome):
    record = next(r for r in reversed(outcome.records) if r.verdict.failing)
    return {f.check for f in record.findings if f.verdict.failing}


@pytest.fixture
def _tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")


def test_lora_megatron_saves_at_tp2_and_loads_at_every_candidate_layout(_tp2):
    """Every designed example (targets by name, by wildcard with one layer's qkv only, in exclude mode; gated
    and plain MLPs; loaded at tp2 and tp1): bit-for-bit adapters, the same logits, each adapter once."""
    outcome = _outcome("lora.megatron")
    assert outcome.verdict is Verdict.PASS, outcome.error
    loads = {r.case.get("load_layout") for r in outcome.records if r.case}
    assert {"tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1"} <= loads


def test_an_adapter_missing_from_the_checkpoint_is_caught_with_a_shrunk_example(_tp2):
    """Megatron-Bridge #5310's class: the adapters never reach the checkpoint."""
    outcome = _outcome("tests.wrong_impls.ckpt_wrapper_drops_adapter")
    assert outcome.verdict.failing and outcome.verdict is not Verdict.HARNESS, outcome.error
    assert {"checkpoint_keys"} <= _failing_checks(outcome), outcome.error
    assert outcome.minimal_case is not None and outcome.minimal_case.load_layout is not None


@pytest.mark.parametrize("impl", [
    # Megatron-Bridge #2240's class: TP shards saved as if each were the whole tensor.
    "tests.wrong_impls.ckpt_replica_ignores_tp",
    # Every rank the main replica: duplicate entries, refused by megatron's sharding validation.
    "tests.wrong_impls.ckpt_replicas_all_main",
])
def test_a_badly_sharded_checkpoint_is_a_named_finding_not_a_hang(_tp2, impl):
    from harness.properties.checkpoint import check
    from harness.runs import Evidence, Executor

    result = check(Evidence(Executor(), _case(TP2, ParallelLayout()).with_(impl=impl)))
    assert result.verdict is Verdict.CONTRACT
    assert {f.check for f in result.findings} == {"checkpoint_save"}
    assert "sharding validation" in result.findings[0].message


def test_a_load_layout_the_example_cannot_use_is_never_drawn():
    """Deep runs drew loads at TP=2 of models saved at TP=1 with one attention head, a rank of 1, or (under
    SP) a sequence of 5: each crashed the load, charged to a correct LoRA. Such layouts are left out."""
    from harness.checkpoint import holds

    saved = ParallelLayout(tp=1, ep=2)
    assert holds(_case(saved), TP2)
    assert not holds(_case(saved).with_(lora=dict(dim=1, alpha=4)), TP2)
    assert not holds(_case(saved, num_attention_heads=1, num_query_groups=1), TP2)
    assert not holds(_case(saved, seq_length=5), ParallelLayout(tp=2, sp=True))
    assert holds(_case(saved, seq_length=5), TP2)


def test_a_load_that_misses_adapters_names_them_and_the_keys_that_went_astray():
    from harness.properties.checkpoint import check
    from harness.runs import Evidence, Executor

    result = check(Evidence(Executor(), _case(ParallelLayout(), ParallelLayout())
                            .with_(impl="tests.wrong_impls.ckpt_state_dict_keys_renamed")))
    assert result.verdict is Verdict.CONTRACT
    [finding] = [f for f in result.findings if f.check == "checkpoint_load"]
    assert "no loaded entry reached" in finding.message and "linear_in.weight" in finding.message
    assert "keys the model does not have" in finding.message and "lin_in.weight" in finding.message
