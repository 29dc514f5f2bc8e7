"""The training loop (harness.training, harness.tasks.training): its configuration is checked in the parent,
megatron-core's DDP and optimizer run on CPU, and training_matches / replicas_identical catch what only a
run under megatron's own DDP shows."""

import dataclasses

import pytest
import torch
from hypothesis import settings

from harness import cpu
from harness.cases import CaseError, case_from_json
from harness.driver import check_property
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape
from harness.layouts import ParallelLayout
from harness.results import Verdict
from harness.training import TrainingLoop, exact_training_case, reference_training_case, training_case

DESIGNED_ONLY = settings(max_examples=1, database=None, deadline=None)
DP2 = ParallelLayout(tp=1, ep=2)  # a dense model at world 2: two data-parallel replicas


def _case(layout=DP2, **loop):
    return GPTCase(shape=GPTShape(num_layers=1), lora=dict(dim=2, alpha=4), seed=3, layout=layout,
                   model_dtype=torch.float64, loop=TrainingLoop(**loop))


@pytest.mark.parametrize("fields, needle", [
    (dict(steps=0), "loop.steps = 0: must be an integer from 1 to 4"),
    (dict(steps=9), "loop.steps = 9"),
    (dict(micro_batches=5), "loop.micro_batches = 5: must be an integer from 1 to 4"),
    (dict(optimizer="lion"), "loop.optimizer = 'lion': must be one of adam, sgd"),
    (dict(optimizer="sgd", distributed_optimizer=True), "distributed optimizer takes Adam only"),
    (dict(recompute="everything"), "loop.recompute = 'everything': must be one of none, full-uniform"),
    (dict(bucket_size=0), "loop.bucket_size = 0"),
    (dict(overlap_grad_reduce="yes"), "loop.overlap_grad_reduce = 'yes': must be true or false"),
    (dict(bf16=1), "loop.bf16 = 1: must be true or false"),
    (dict(bf16=True), "bf16 = true with optimizer = 'adam'"),
])
def test_a_bad_loop_is_one_clear_error_naming_the_field(fields, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        TrainingLoop(**fields)
    data = _case().to_json()
    data["loop"] = {**data["loop"], **fields}
    with pytest.raises(ValueError, match="loop"):
        case_from_json(data)


def test_a_bf16_loop_at_tp2_is_refused_before_any_rank_starts():
    """Partial sums round in bf16 at TP > 1 where the single-device run's do not: the 16-bit rule cannot
    bound a cancelling gradient's error there (a deep run charged a correct LoRA 18 times the bound)."""
    with pytest.raises(CaseError, match="bf16 loops run at TP=1"):
        _case(ParallelLayout(tp=2), optimizer="sgd", bf16=True).validate()
    _case(DP2, optimizer="sgd", bf16=True).validate()


def test_a_distributed_optimizer_without_data_parallelism_is_refused_before_any_rank_starts():
    case = _case(ParallelLayout(tp=2), distributed_optimizer=True)
    with pytest.raises(CaseError, match="DP=1"):
        case.validate()
    _case(DP2, distributed_optimizer=True).validate()  # DP=2: fine


def test_the_loop_travels_in_the_case_json_and_a_case_without_one_keeps_its_old_form():
    case = _case(steps=3, micro_batches=2, optimizer="sgd", overlap_grad_reduce=True, bucket_size=64, recompute="selective")
    assert case_from_json(case.to_json()) == case
    assert "loop" not in dataclasses.replace(case, loop=None).to_json()


def test_the_sides_train_in_the_dtypes_the_loop_allows():
    adam = _case(distributed_optimizer=True)
    assert training_case(adam).model_dtype == torch.float32  # megatron's distributed optimizer: 32/16-bit only
    assert training_case(_case()).model_dtype == torch.float64
    ref = reference_training_case(adam, "lora.reference")
    # A float32 loop is judged by the 16-bit rule: the single-device loop in float32, float64 on its values.
    assert ref.layout.min_world_size == 1 and ref.model_dtype == torch.float32
    assert ref.loop.replicas == 2 and not ref.loop.distributed_optimizer and ref.loop.recompute == "none"
    exact32 = exact_training_case(adam, "lora.reference")
    assert exact32.model_dtype == torch.float64 and exact32.value_grid == ("float32", "float32")
    assert reference_training_case(_case(), "lora.reference").model_dtype == torch.float64
    assert training_case(_case()).lora["dropout"] == 0.0
    bf16 = _case(optimizer="sgd", bf16=True, grad_reduce_in_fp32=True)
    assert training_case(bf16).model_dtype == torch.bfloat16
    # Judged by the 16-bit rule: the single-device bf16 loop, and float64 on its exact starting values.
    ref16, exact = reference_training_case(bf16, "lora.reference"), exact_training_case(bf16, "lora.reference")
    assert ref16.model_dtype == torch.bfloat16 and ref16.loop.bf16 and ref16.value_grid is None
    assert exact.model_dtype == torch.float64 and not exact.loop.bf16 and exact.value_grid == ("bfloat16", "bfloat16")
    assert exact.loop.replicas == ref16.loop.replicas == 2


def test_megatron_tensor_factories_asked_for_cuda_give_cpu_tensors_only_inside_megatron():
    cpu.activate()
    import megatron.core.optimizer.optimizer as opt_module

    cpu.patch_loaded_modules()
    assert opt_module.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert opt_module.torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert opt_module.torch.ones(1).device.type == "cpu"


def test_cuda_tensor_types_names_cpu_tensors_as_cuda_for_a_while_only():
    t = torch.zeros(1)
    assert t.type() == "torch.FloatTensor"
    with cpu.cuda_tensor_types():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64  # a conversion is left alone
    assert t.type() == "torch.FloatTensor"


@pytest.fixture
def _world2(max_ep):
    if max_ep < 2:
        pytest.skip("needs --ep 2 (two data-parallel replicas of a dense model)")


def _outcome(prop, impl, layout=DP2):
    return check_property(prop, layout, impl, settings=DESIGNED_ONLY, family="gpt", seed=5, shrink_budget=2)


def _failing_checks(outcome):
    record = next(r for r in reversed(outcome.records) if r.verdict.failing)
    return {f.check for f in record.findings if f.verdict.failing}


def test_dense_adapters_reduced_over_the_expert_group_drift_apart(_world2):
    replicas = _outcome("replicas_identical", "tests.wrong_impls.ddp_dense_as_expert")
    assert replicas.verdict is Verdict.NUMERIC, replicas.error
    assert _failing_checks(replicas) == {"replicas_bitwise"} and "drifted apart" in replicas.error
    training = _outcome("training_matches", "tests.wrong_impls.ddp_dense_as_expert")
    assert training.verdict is Verdict.NUMERIC and "training_adapters" in _failing_checks(training), training.error


def test_a_gradient_buffer_reset_at_each_forward_loses_the_accumulated_micro_batches(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    outcome = _outcome("training_matches", "tests.wrong_impls.ddp_grad_buffer_reset", ParallelLayout(tp=2))
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    assert outcome.minimal_case.loop.micro_batches > 1  # one micro-batch per step trains right


def test_a_frozen_checkpoint_input_cannot_train_inside_the_loop(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    outcome = _outcome("training_matches", "tests.wrong_impls.recompute_frozen_input", ParallelLayout(tp=2))
    assert outcome.verdict.failing and outcome.verdict is not Verdict.HARNESS, outcome.error
    assert outcome.minimal_case.loop.recompute != "none"


def test_expert_adapters_reduced_over_dense_dp_where_etp_differs_from_tp_drift_apart(max_tp):
    """Megatron-Bridge #5231's class: at TP=2, ETP=1, EP=1 the expert-data-parallel group is the TP pair
    and dense DP is 1: expert adapters flagged for ordinary DP are reduced over nobody."""
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    layout = ParallelLayout(tp=2, ep=1, etp=1, sp=True)
    kw = dict(settings=DESIGNED_ONLY, family="moe", seed=5, shrink_budget=2)
    replicas = check_property("replicas_identical", layout, "tests.wrong_impls.ddp_expert_as_dense", **kw)
    assert replicas.verdict is Verdict.NUMERIC and "experts" in replicas.error, replicas.error
    assert check_property("replicas_identical", layout, "lora.megatron", **kw).verdict is Verdict.PASS
    training = check_property("training_matches", layout, "tests.wrong_impls.ddp_expert_as_dense", **kw)
    assert training.verdict is Verdict.NUMERIC, training.error


def test_dense_adapters_reduced_over_the_expert_group_in_a_moe_model_are_caught_by_design(max_tp):
    """At moe TP=2, EP=1, ETP=1 dense DP is 1 and expert DP is the TP pair: a dense adapter flagged as
    an expert parameter is averaged over it. Only rows with dense targets can show that; the MoE
    training rows once adapted routed experts alone, so only a drawn example caught it."""
    if max_tp < 2:
        pytest.skip("needs --tp 2")
    layout = ParallelLayout(tp=2, ep=1, etp=1, sp=True)
    outcome = check_property("training_matches", layout, "tests.wrong_impls.ddp_dense_as_expert",
                             settings=DESIGNED_ONLY, family="moe", seed=5, shrink_budget=2)
    assert outcome.verdict is Verdict.NUMERIC, outcome.error
    first = next(r for r in outcome.records if r.verdict.failing)
    assert first.source == "designed" and outcome.records.index(first) == 0  # the first designed row
    assert outcome.minimal_case.lora["target_modules"] != ["*.experts.*linear_fc1", "*.experts.*linear_fc2"]


def test_the_paths_line_names_the_training_loops_the_examples_ran():
    from harness.design import coverage_of

    plain = _case().with_(loop=None).to_json()
    loops = [_case(optimizer="sgd", recompute="selective").to_json(),
             _case(distributed_optimizer=True, overlap_grad_reduce=True, micro_batches=3).to_json()]
    line = coverage_of("gpt", DP2, None, [plain] + loops, 0).line()
    assert "training loops: steps 2; micro_batches 1/3; optimizer adam/sgd; distributed_optimizer off/on" in line
    assert "overlap_grad_reduce off/on" in line and "recompute none/selective" in line
    assert "training loops" not in coverage_of("gpt", DP2, None, [plain], 0).line()


def test_an_moe_loop_in_float32_is_refused_in_the_parent():
    """An MoE router's top-k flips near ties between float32 and the float64 reference (the first deep
    run of training_matches charged lora.megatron with such a flip): the MoE family trains in float64."""
    from harness.families.moe.case import MoECase
    from harness.families.moe.model import MoEShape

    layout = ParallelLayout(tp=1, ep=2)
    for loop in (TrainingLoop(distributed_optimizer=True), TrainingLoop(grad_reduce_in_fp32=True),
                 TrainingLoop(optimizer="sgd", bf16=True)):
        case = MoECase(shape=MoEShape(seq_length=8), lora=dict(dim=2, alpha=4), seed=3, layout=layout,
                       model_dtype=torch.float64, loop=loop)
        with pytest.raises(CaseError, match="MoE family trains in float64"):
            case.validate()


def _bf16_verdicts(impl, layout):
    """training_matches on two bf16 loops (megatron's Float16OptimizerWithFloat16Params against the
    single-device bf16 loop and float64 on the same exact values)."""
    from harness.properties.training import check_training
    from harness.runs import Evidence, Executor

    executor = Executor()
    out = []
    for loop in (TrainingLoop(steps=2, micro_batches=2, optimizer="sgd", bf16=True),
                 TrainingLoop(steps=2, micro_batches=2, optimizer="sgd", bf16=True, grad_reduce_in_fp32=True)):
        case = GPTCase(shape=GPTShape(num_layers=2), lora=dict(dim=4, alpha=8), seed=1, layout=layout, impl=impl,
                       model_dtype=torch.float32, loop=loop)
        ev = Evidence(executor, case)
        out.append((check_training(ev), ev.training[0].extras.optimizer))
    return out


def test_a_bf16_loop_runs_megatrons_mixed_precision_and_judges_the_float32_main_values(_world2):
    """bf16 parameters with float32 main parameters in megatron's optimizer: a correct LoRA passes the
    16-bit rule on what the steps added to the adapters; losing a micro-batch fails it (an SGD step of lr
    0.01 is below a bf16 weight's last bit, so only the main values show it)."""
    for check, optimizer in _bf16_verdicts("lora.megatron", DP2):
        assert optimizer == "ChainedOptimizer" and check.verdict is Verdict.PASS, [f.message for f in check.findings]
        assert any(c.stats.baseline_abs is not None for c in check.comparisons)  # the 16-bit rule, not a fixed bound
    for check, _ in _bf16_verdicts("tests.wrong_impls.ddp_grad_buffer_reset", DP2):
        assert check.verdict is Verdict.NUMERIC
        assert {f.check for f in check.findings} >= {"training_adapters"}
        assert "16-bit error against float64" in check.findings[0].message


def test_replicas_hold_different_numbers_of_valid_tokens():
    from harness.tasks.training import token_mask

    counts = {int(token_mask(3, f"0.{replica}.{mb}", 2, 8).sum()) for replica in range(2) for mb in range(3)}
    assert len(counts) > 1 and all(1 <= c <= 16 for c in counts)
    assert torch.equal(token_mask(3, "0.1.0", 2, 8), token_mask(3, "0.1.0", 2, 8))  # seeded: every rank agrees


def test_a_loop_that_normalises_each_replica_by_its_own_tokens_fails_training_matches(_world2):
    """Per-replica local token normalisation under megatron's per-token loss: the replicas hold different
    numbers of valid tokens, so the mean of their means is another objective than the global batch's."""
    from harness.properties.training import check_training
    from harness.runs import Evidence, Executor

    executor = Executor()
    loop = TrainingLoop(steps=2, micro_batches=2, optimizer="sgd", per_token_loss=True)
    case = _case(DP2).with_(loop=loop)
    assert check_training(Evidence(executor, case)).verdict is Verdict.PASS
    wrong = Evidence(executor, case)
    from tests.helpers.local_token_loss import run_local_token_loss

    wrong._runs["training"] = executor.run(training_case(case), run_local_token_loss)
    check = check_training(wrong)
    assert check.verdict is Verdict.NUMERIC and {f.check for f in check.findings} >= {"training_adapters"}
