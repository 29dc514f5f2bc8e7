"""A verdict is a promise: chance checks state their power, empty checks say so, failures are controlled.

* ``dropout_follows_spec``'s "it drops" check decides only where a correct
  implementation would fail it with probability <= 1e-6, and is vacuous
  where no adapter drops (the two cases that failed ``lora.megatron``);
* a failing example is rerun with a known-good control implementation; if
  that fails too, the verdict is ``harness`` (never charged), shrinking
  never walks into such cases, and none is stored as a regression;
* the wrong implementations keep their charged verdicts.
"""

import json

import pytest
import torch
from hypothesis import settings

from harness.cases import case_from_json
from harness.families.gpt.case import GPTCase
from harness.driver import check_property, control_impl, judge_example
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape
from harness.properties import Property, get_property
from harness.properties.dropout_spec import drop_nothing_probability
from harness.regressions import RegressionStore
from harness.results import FALSE_ALARM, Check, ExampleRecord, PropertyOutcome, RunResults, Verdict
from harness.runs import Executor

TP1, TP2 = ParallelLayout(), ParallelLayout(tp=2)
NEVER_DROPS = "tests.wrong_impls.dropout_never_applied"
# Any implementation other than lora.megatron gets lora.megatron as its control.
OTHER_CORRECT = "tests.impls.megatron_alias"


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


# ------------------------------------------------------------ chance checks


def test_drop_nothing_probability_is_the_false_alarm_rate():
    assert drop_nothing_probability(0.1, 32) == pytest.approx(0.9 ** 32)  # the case: 0.034
    assert drop_nothing_probability(0.1, 131) > FALSE_ALARM >= drop_nothing_probability(0.1, 132)
    assert drop_nothing_probability(0.5, 20) <= FALSE_ALARM
    assert drop_nothing_probability(0.1, 0) == 1.0 and drop_nothing_probability(0.0, 10**6) == 1.0


def test_the_tiny_dense_case_that_failed_lora_megatron_is_not_decided():
    """hidden 4, sequence 1, micro-batch 1, dropout 0.1 at tp2-ep1-etp2-pp1: too few elements for a verdict."""
    shape = GPTShape(num_layers=1, hidden_size=4, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=4,
                     vocab_size=4, seq_length=1, micro_batch_size=1)
    case = GPTCase(shape=shape, lora=dict(dim=2, alpha=2, dropout=0.1), seed=0, layout=TP2, model_dtype=torch.float64)
    record = judge_example(get_property("dropout_follows_spec"), case, Executor())
    assert not record.verdict.failing, record.error
    undecided = [n for n in record.notes if n.check == "dropout_drops"]
    assert len(undecided) == 1 and undecided[0].status == "undecidable"
    assert undecided[0].p_false_alarm > FALSE_ALARM


def test_a_target_with_no_module_is_vacuous_not_failed():
    """An MoE model without shared experts whose only target is the shared experts: nothing drops, nothing to check."""
    from hypothesis import find

    from harness.families.moe.strategy import moe_cases

    layout = ParallelLayout(tp=2, etp=1, sp=True)
    base = find(moe_cases(layout), lambda c: True, settings=settings(database=None))
    case = base.with_(lora=dict(base.lora, target_modules=["*shared_experts.linear_fc*"], exclude_modules=[],
                                dropout=0.5, dropout_position="pre"),
                      training=True, shape=_without_shared_experts(base.shape), model_dtype=torch.float64, lora_dtype=None)
    record = judge_example(get_property("dropout_follows_spec"), case, Executor())
    assert record.verdict is Verdict.VACUOUS, (record.verdict, record.error)
    assert "no dropout call" in record.vacuous
    forward = judge_example(get_property("forward_matches"), case, Executor())
    assert forward.verdict is Verdict.VACUOUS and "adapted nothing" in forward.vacuous


def _without_shared_experts(shape):
    import dataclasses

    return dataclasses.replace(shape, shared_expert_ffn_hidden_size=None)


def test_an_implementation_that_never_drops_is_caught_with_a_decidable_minimal_case():
    outcome = check_property("dropout_follows_spec", TP2, NEVER_DROPS, seed=7, shrink_budget=12,
                             settings=settings(max_examples=40, database=None, deadline=None), designed=False)
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert "dropped nothing" in outcome.error
    case = outcome.minimal_case
    assert case.training and case.lora["dropout"] > 0
    # The minimal case is one on which the correct implementation passes: the
    # shrinker stayed where the check has its power.
    control = judge_example(get_property("dropout_follows_spec"), case.with_(impl="lora.megatron"), Executor())
    assert control.verdict is Verdict.PASS, control.error
    charged = [r for r in outcome.records if r.verdict.failing]
    assert charged and all(r.control is not None and r.control.verdict is Verdict.PASS for r in charged)


# ------------------------------------------------------------ controls


def _always_fails(ev) -> Check:
    result = Check("harness_bug_always")
    result.fail("a check that fails every example, whatever the implementation", kind="numeric", check="planted")
    return result


ALWAYS_FAILS = Property(name="harness_bug_always", check=_always_fails, needs=(), doc="a planted harness defect")


def _fails_on_one_layer(ev) -> Check:
    """A harness defect confined to one-layer models, over a real defect of the wrong implementation."""
    result = Check("harness_bug_one_layer")
    if ev.case.shape.num_layers == 1:
        result.fail("planted harness defect on one-layer models", kind="numeric", check="planted")
    elif ev.case.impl == NEVER_DROPS:
        result.fail("the wrong implementation, on any model", kind="contract", check="planted")
    return result


ONE_LAYER_BUG = Property(name="harness_bug_one_layer", check=_fails_on_one_layer, needs=(), doc="a planted harness defect")


def test_control_implementations():
    assert control_impl("mypkg.lora", TP2) == "lora.megatron"
    assert control_impl("lora.megatron", TP1) == "lora.reference"
    assert control_impl("lora.megatron", TP2) is None  # no independent implementation there


def test_a_check_that_fails_every_example_is_a_harness_verdict_never_charged(tmp_path):
    store = RegressionStore(tmp_path / "regressions")
    outcome = check_property(ALWAYS_FAILS, TP2, OTHER_CORRECT, seed=1, regressions=store,
                             settings=settings(max_examples=3, database=None, deadline=None), designed=False)
    assert outcome.verdict is Verdict.HARNESS and not outcome.passed and not outcome.verdict.failing
    assert "HARNESS DEFECT" in outcome.error and "lora.megatron" in outcome.error and OTHER_CORRECT in outcome.error
    assert outcome.minimal_case is not None and outcome.replay_command
    assert all(r.verdict is Verdict.HARNESS and r.control is not None for r in outcome.records)
    assert not list((tmp_path / "regressions").glob("*.json")), "a harness defect must never be stored"
    results = RunResults(impl=OTHER_CORRECT, capabilities={}, environment={}, outcomes=[outcome])
    assert results.exit_code == 3 and not results.failed


def test_lora_megatron_at_one_rank_is_controlled_by_the_reference():
    outcome = check_property(ALWAYS_FAILS, TP1, "lora.megatron", seed=1,
                             settings=settings(max_examples=2, database=None, deadline=None), designed=False)
    assert outcome.verdict is Verdict.HARNESS and "lora.reference" in outcome.error


def test_shrinking_never_walks_into_a_case_whose_control_fails(tmp_path):
    store = RegressionStore(tmp_path / "regressions")
    outcome = check_property(ONE_LAYER_BUG, TP2, NEVER_DROPS, seed=3, regressions=store, shrink_budget=12,
                             settings=settings(max_examples=30, database=None, deadline=None), designed=False)
    assert outcome.verdict is Verdict.CONTRACT, outcome.error
    assert outcome.minimal_case.shape.num_layers == 2  # the one-layer cases are the harness's, not charged
    stored = list((tmp_path / "regressions").glob("*.json"))
    assert len(stored) == 1
    case = case_from_json(json.loads(stored[0].read_text())["case"])
    assert case.shape.num_layers == 2


def test_a_vacuous_cell_is_reported_as_such_not_as_a_pass():
    from harness.driver import _conclude_without_failure

    records = [ExampleRecord("p", "tp1", {}, Verdict.VACUOUS, 0.1, vacuous="no adapter") for _ in range(3)]
    outcome = PropertyOutcome(prop="p", layout="tp1", impl="x", records=records, examples=3)
    _conclude_without_failure(outcome, {})
    assert outcome.verdict is Verdict.VACUOUS and outcome.passed and "no adapter" in outcome.error
    assert outcome.summary_line().startswith("VOID")
    mixed = PropertyOutcome(prop="p", layout="tp1", impl="x", records=records + [
        ExampleRecord("p", "tp1", {}, Verdict.PASS, 0.1)], examples=4)
    _conclude_without_failure(mixed, {})
    assert mixed.verdict is Verdict.PASS and "3 vacuous" in mixed.summary_line()


def test_equal_sequence_shards_are_not_taken_for_a_replicated_tensor(max_ep):
    """Deep seed 1001 charged lora.megatron with dropout_replicated_mask at tp2-ep2-etp2-pp1-sp: a saturated
    causal softmax gave both tokens the same attention output, so each TP rank's sequence shard of the
    linear_proj adapter's output was equal, and its (correctly) independent masks were read as a
    replicated tensor dropped differently. A call on a possible sequence shard decides nothing now."""
    if max_ep < 2:
        pytest.skip("the case's layout has four ranks (--ep 2)")
    case = case_from_json({'contract': 'strict', 'family': 'gpt', 'impl': 'lora.megatron', 'layout': 'tp2-ep2-etp2-pp1-sp', 'lora': {'a2a_experimental': False, 'alpha': 32, 'dim': 8, 'dropout': 0.1, 'dropout_position': 'post', 'exclude_modules': [], 'lora_A_init_method': 'xavier', 'lora_B_init_method': 'xavier', 'target_modules': ['linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2']}, 'lora_dtype': None, 'micro_batches': 1, 'model_dtype': 'float64', 'seed': 831905, 'shape': {'add_bias_linear': False, 'ffn_hidden_size': 12, 'gated_linear_unit': True, 'hidden_size': 32, 'micro_batch_size': 1, 'num_attention_heads': 4, 'num_layers': 2, 'num_query_groups': 4, 'seq_length': 2, 'vocab_size': 12}, 'training': True, 'value_grid': None})
    record = judge_example(get_property("dropout_follows_spec"), case, Executor())
    assert record.verdict is Verdict.PASS, record.error
