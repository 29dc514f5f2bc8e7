"""checkpoint_roundtrip on the MoE family: expert adapters (SequentialMLP experts, a grouped linear's per-expert
and shared adapters) saved at one EP/ETP/TP layout load at another by the expert they belong to; the checks
fail for the expert checkpoint bugs of tests/wrong_impls."""

import pytest
from hypothesis import settings

from harness.checkpoint import load_layouts
from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.results import Verdict

DESIGNED_ONLY = settings(max_examples=1, database=None, deadline=None)
EP2 = ParallelLayout(tp=1, ep=2)


@pytest.fixture
def _ep2(max_ep):
    if max_ep < 2:
        pytest.skip("needs --ep 2")


def _outcome(impl, layout=EP2):
    return check_property("checkpoint_roundtrip", layout, impl, settings=DESIGNED_ONLY, family="moe", seed=5,
                          shrink_budget=2)


def _failing_checks(outcome):
    record = next(r for r in reversed(outcome.records) if r.verdict.failing)
    return {f.check for f in record.findings if f.verdict.failing}


def test_the_expert_layouts_load_across_ep_etp_and_tp():
    """Each saved layout loads at itself and at the layout that changes most of TP, EP and ETP: together
    EP 2 -> 1 and 1 -> 2, ETP 1 -> 2 and 2 -> 1, TP 2 -> 1 and 1 -> 2."""
    from harness.families import get_family

    pairs = {(x, load_layouts("moe", x)[-1]) for x in get_family("moe").layouts(2, 2)}
    assert all(load_layouts("moe", x)[0] == x for x, _ in pairs)
    changes = {(axis, getattr(x, axis if axis != "etp" else "etp_size"), getattr(y, axis if axis != "etp" else "etp_size"))
               for x, y in pairs for axis in ("tp", "ep", "etp")}
    assert {("ep", 2, 1), ("ep", 1, 2), ("etp", 1, 2), ("etp", 2, 1), ("tp", 2, 1), ("tp", 1, 2)} <= changes


def test_lora_megatron_expert_adapters_load_at_another_ep_size(_ep2):
    """Sequential and grouped experts, per-expert and shared adapters (the designed rows), saved at EP=2 and
    loaded at EP=1 with TP=ETP=2 and at EP=2: bit for bit, the same logits, every expert's adapter once."""
    outcome = _outcome("lora.megatron")
    assert outcome.verdict is Verdict.PASS, outcome.error
    rows = {(r.case["shape"]["grouped"], r.case["lora"].get("share_expert_adapters", True), r.case["load_layout"])
            for r in outcome.records if r.case}
    assert {(True, True), (True, False), (False, True)} <= {(g, s) for g, s, _ in rows}
    assert {"tp1-ep2-etp1-pp1", "tp2-ep1-etp2-pp1-sp"} <= {y for _, _, y in rows}


def test_per_expert_adapters_saved_by_local_index_lose_an_ep_ranks_experts(_ep2):
    """The class of Megatron-Bridge #3951 / #5379: one EP rank's values stand for every rank's."""
    outcome = _outcome("tests.wrong_impls.ckpt_experts_local_index")
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert "checkpoint_keys" in _failing_checks(outcome), outcome.error
    minimal = outcome.minimal_case
    assert minimal is not None and minimal.shape.grouped and not minimal.lora["share_expert_adapters"]


def test_a_shared_expert_adapter_saved_by_every_ep_rank_is_refused_before_the_save(_ep2):
    outcome = _outcome("tests.wrong_impls.ckpt_shared_expert_per_ep_rank")
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert _failing_checks(outcome) == {"checkpoint_save"}, outcome.error
    assert "sharding validation" in outcome.error
    assert outcome.minimal_case.shape.grouped and outcome.minimal_case.lora["share_expert_adapters"]


def test_a_shared_expert_adapter_saved_from_one_ep_rank_loads_another_model(_ep2):
    """Megatron-Bridge #5379's class: each EP rank trained its own copy of the shared adapter; the checkpoint
    keeps rank 0's, so the loaded model's logits are not those of the model that was saved."""
    outcome = _outcome("tests.wrong_impls.ckpt_shared_expert_one_ep_rank")
    assert outcome.verdict.failing, outcome.error
    assert "checkpoint_logits" in _failing_checks(outcome), outcome.error
    minimal = outcome.minimal_case
    assert minimal.shape.grouped and minimal.lora["share_expert_adapters"]


def test_deep_seed_1400_s_false_alarms_are_gone(_ep2):
    """Deep seed 1400 charged lora.megatron twice: (a) biased grouped experts with a gated fc1 crashed
    ``sharded_state_dict`` in megatron's SwiGLU factory (the harness's CPU grouped linear had no
    ``sharded_state_dict``, so megatron's default made its 1-D bias a replicated tensor without the expert
    axis TEGroupedMLP expects); (b) a normalised expert rank of 1 was loaded at ETP=2, which cannot split it."""
    from harness.checkpoint import holds
    from harness.families.moe.case import MoECase
    from harness.families.moe.model import MoEShape

    from harness.cases import case_from_json
    from harness.driver import judge_example
    from harness.properties import get_property
    from harness.runs import Executor

    case = case_from_json({
        "contract": "strict", "family": "moe", "impl": "lora.megatron", "layout": "tp2-ep1-etp1-pp1-sp",
        "load_layout": "tp2-ep1-etp1-pp1-sp", "lora": {"alpha": 1, "dim": 2, "dropout": 0.0, "dropout_position": "pre",
        "exclude_modules": [], "lora_A_init_method": "xavier", "lora_B_init_method": "xavier", "normalize_moe_lora": False,
        "share_expert_adapters": True, "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
        "lora_dtype": None, "micro_batches": 1, "model_dtype": "float64", "seed": 0, "shape": {"add_bias_linear": True,
        "dispatcher": "allgather", "ffn_hidden_size": 4, "gated_linear_unit": True, "grouped": True, "hidden_size": 8,
        "micro_batch_size": 1, "moe_ffn_hidden_size": 2, "moe_router_topk": 1, "num_attention_heads": 2,
        "num_experts": 2, "num_layers": 1, "num_query_groups": 2, "seq_length": 10, "shared_expert_ffn_hidden_size": None,
        "shared_expert_overlap": False, "vocab_size": 4}, "training": True, "value_grid": None})
    record = judge_example(get_property("checkpoint_roundtrip"), case, Executor())
    assert record.verdict is Verdict.PASS, record.findings
    normalised = MoECase(shape=MoEShape(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                                        ffn_hidden_size=2, vocab_size=4, seq_length=8, num_experts=4, moe_router_topk=2,
                                        moe_ffn_hidden_size=4),
                         lora=dict(dim=2, alpha=1, normalize_moe_lora=True), seed=1, layout=EP2)
    assert not holds(normalised, ParallelLayout(tp=2, sp=True)) and holds(normalised, ParallelLayout(tp=2, etp=1, sp=True))
