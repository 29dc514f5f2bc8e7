"""Pipeline layouts (harness.pipeline, harness.families.gpt.pipeline): a stage's chunks read by PP=1 names,
megatron-core's schedule on gloo, patterns meaning the whole model's layers, and the checks failing for the
pipeline bugs of tests/wrong_impls."""

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness.cases import CaseError, case_from_json
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape
from harness.layouts import ParallelLayout
from harness.pipeline import global_view
from harness.plan import Plan, PlanError
from harness.results import Verdict
from lora.megatron.walk import global_layer_names

PP2 = ParallelLayout(pp=2)
VPP = ParallelLayout(pp=2, vpp=2)


class _Layer(nn.Module):
    def __init__(self, number):
        super().__init__()
        self.layer_number = number
        self.linear_qkv = nn.Linear(2, 2)


class _Block(nn.Module):
    def __init__(self, numbers, final=False):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(n) for n in numbers)
        if final:
            self.final_layernorm = nn.LayerNorm(2)


class _Chunk(nn.Module):
    def __init__(self, numbers, first=False, last=False, pp=2):
        super().__init__()
        self.config = SimpleNamespace(pipeline_model_parallel_size=pp)
        if first:
            self.embedding = nn.Embedding(4, 2)
        self.decoder = _Block(numbers, final=last)
        if last:
            self.output_layer = nn.Linear(2, 4)


def test_a_stage_is_read_by_the_names_a_pp1_model_gives_its_parameters():
    # Stage 0 of pp2 x vpp2 over 4 layers: chunk 0 holds layer 1 (with the embedding), chunk 1 layer 3.
    chunks = [_Chunk([1], first=True), _Chunk([3])]
    view = global_view(chunks, training=False)
    names = [n for n, _ in view.named_parameters()]
    assert names == ["embedding.weight", "decoder.layers.0.linear_qkv.weight", "decoder.layers.0.linear_qkv.bias",
                     "decoder.layers.2.linear_qkv.weight", "decoder.layers.2.linear_qkv.bias"]
    # The chunks' own tensors (nothing copied), and the view's mode is its own.
    assert view.get_parameter("decoder.layers.2.linear_qkv.weight") is chunks[1].decoder.layers[0].linear_qkv.weight
    assert view.training is False and chunks[0].training is True
    last = global_view([_Chunk([2], last=True)])
    assert [n for n, _ in last.named_parameters()][-4:] == [
        "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight", "output_layer.bias"]
    with pytest.raises(ValueError, match="layer number 1"):
        global_view([_Chunk([1]), _Chunk([1])])


def test_lora_megatron_names_a_stage_s_layers_by_their_global_number():
    assert global_layer_names(_Chunk([3, 4])) == {"decoder.layers.0": "decoder.layers.2", "decoder.layers.1": "decoder.layers.3"}
    # Without a pipeline the names stay as they are, whatever layer_number says.
    assert global_layer_names(_Chunk([3, 4], pp=1)) == {}


def test_pipeline_layouts_are_in_the_plan_only_with_pp():
    plan = Plan(2, 2, pp=2)
    gpt = {str(layout) for layout in plan.layouts["gpt"]}
    assert {"tp1-ep1-etp1-pp2", "tp1-ep1-etp1-pp2-vpp2", "tp2-ep1-etp2-pp2"} <= gpt
    assert [str(layout) for layout in plan.layouts["moe"] if layout.pp > 1] == ["tp1-ep2-etp1-pp2"]
    assert [str(layout) for layout in plan.layouts["vlm"] if layout.pp > 1] == ["tp1-ep1-etp1-pp2"]
    assert all(layout.pp == 1 for ls in Plan(2, 2).layouts.values() for layout in ls)
    with pytest.raises(PlanError, match="--pp 3"):
        Plan(2, 1, pp=3)


def test_a_pipeline_case_travels_in_its_json_and_a_bad_one_is_refused_before_any_rank_starts():
    case = _case(VPP, num_layers=4)
    assert case_from_json(case.to_json()) == case and case.to_json()["layout"] == "tp1-ep1-etp1-pp2-vpp2"
    with pytest.raises(CaseError, match=r"num_layers=2 must be divisible by pp\*vpp=2\*2=4"):
        _case(VPP, num_layers=2).validate()
    with pytest.raises(CaseError, match=r"num_layers=3 must be divisible by pp\*vpp=2\*1=2"):
        _case(PP2, num_layers=3).validate()


def test_properties_without_a_pipeline_task_are_skipped_there_with_the_reason():
    from harness.contract import Capabilities
    from harness.properties import get_property

    from harness.properties import Property

    # A property whose tasks build no stages (a plugin's, by default) is skipped there with that reason; one
    # that names the families whose tasks do runs for those.
    plain = Property(name="plugin_check", check=lambda ev: None, needs=("impl",), doc="", families=("gpt", "moe"))
    reason = plain.skip_reason("moe", PP2, Capabilities())
    assert reason and "moe family's pipeline layouts" in reason and "pp=2" in reason
    some = Property(name="plugin_check", check=lambda ev: None, needs=("impl",), doc="", families=("gpt", "moe"),
                    pipeline=("gpt",))
    assert some.skip_reason("gpt", PP2, Capabilities()) is None and some.skip_reason("moe", PP2, Capabilities())
    # Every built-in property of the dense and MoE families runs at their pipeline layouts.
    for name in ("shared_expert_adapters_identical", "adapters_switch_off", "checkpoint_roundtrip", "training_matches"):
        assert get_property(name).skip_reason("moe", ParallelLayout(ep=2, pp=2), Capabilities()) is None, name
    assert get_property("adapters_switch_off").skip_reason("gpt", PP2, Capabilities()) is None
    # The initial values are promised across TP and EP layouts, not across stage splits.
    assert "each pipeline stage draws its own" in get_property("init_matches_layouts").skip_reason("gpt", PP2, Capabilities())
    assert get_property("backward_matches").skip_reason("gpt", PP2, Capabilities()) is None


def _case(layout, impl="lora.megatron", num_layers=2, **lora):
    return GPTCase(
        shape=GPTShape(num_layers=num_layers, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=16,
                       vocab_size=8, seq_length=4),
        lora=dict(dim=2, alpha=4, target_modules=["*.layers.0.*.linear_qkv", "*linear_fc2"], exclude_modules=[]) | lora,
        seed=11, layout=layout, impl=impl, model_dtype=torch.float64, training=True, micro_batches=2)


@functools.lru_cache(maxsize=1)
def _executor():
    """One executor for the module: examples that share a run (the reference's, say) make it once."""
    from harness.runs import Executor

    return Executor()


def _checks(case):
    from harness.properties.backward import check as backward
    from harness.properties.forward import check as forward
    from harness.runs import Evidence

    ev = Evidence(_executor(), case)
    return forward(ev), backward(ev)


@pytest.mark.parametrize("pipeline", [PP2, VPP], ids=str)
def test_lora_megatron_through_megatron_s_schedule_matches_the_reference(pipeline):
    """Two micro-batches through the one-forward-one-backward and the interleaved schedules: the logits from the
    last stage, the input gradient from the first and every stage's adapter gradients equal the reference's."""
    fwd, bwd = _checks(_case(pipeline, num_layers=pipeline.stages))
    assert fwd.verdict is Verdict.PASS and bwd.verdict is Verdict.PASS, (fwd.findings, bwd.findings)
    assert len(bwd.comparisons) > 4 and not bwd.vacuous


def test_matching_a_stage_s_local_layer_names_is_caught():
    """``*.layers.0.*`` at PP=2 means the model's first layer; matched per stage it adapts every stage's first."""
    fwd, bwd = _checks(_case(PP2, impl="tests.wrong_impls.pp_stage_local_names"))
    assert fwd.verdict.failing and bwd.verdict.failing
    unexpected = [f.message for f in bwd.findings if f.check == "adapted_set"]
    assert unexpected and "decoder.layers.1.self_attention.linear_qkv.adapter" in unexpected[0]
    # And named as what it is, on every rank of the stage that holds the extra adapter.
    from harness.properties.adapters_spec import check as adapters
    from harness.runs import Evidence

    named = adapters(Evidence(_executor(), _case(PP2, impl="tests.wrong_impls.pp_stage_local_names")))
    assert named.verdict is Verdict.CONTRACT
    [finding] = [f for f in named.findings if f.check == "stage_local_names"]
    assert "decoder.layers.1.self_attention.linear_qkv" in finding.message and "local names" in finding.message


def test_adapting_only_the_first_of_a_stage_s_chunks_is_caught():
    fwd, bwd = _checks(_case(VPP, impl="tests.wrong_impls.pp_first_chunk_only", num_layers=4))
    assert bwd.verdict.failing
    missing = [f.message for f in bwd.findings if f.check == "adapted_set"]
    assert missing and "decoder.layers.2.mlp.linear_fc2.adapter" in missing[0]


def test_lora_megatron_merges_and_drops_through_the_schedule():
    from harness.properties.dropout_spec import check as dropout
    from harness.properties.merge import check as merge
    from harness.runs import Evidence

    ev = Evidence(_executor(), _case(VPP, num_layers=4, dropout=0.5))
    for result in (merge(ev), dropout(ev)):
        assert result.verdict is Verdict.PASS, result.findings


@pytest.fixture
def _tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2")


@pytest.mark.parametrize("impl, prop, where, verdict, sub", [
    # The fold without alpha/dim: the merged modules and model differ from W + (alpha/dim) B A.
    ("tests.wrong_impls.merge_without_scale", "merge", PP2, Verdict.NUMERIC, ""),
    # Each TP rank its own mask on a tensor replicated over TP, inside each stage.
    ("tests.wrong_impls.dropout_mask_per_rank", "dropout_spec", ParallelLayout(tp=2, pp=2), Verdict.CONTRACT,
     "dropout_replicated_mask"),
], ids=["merge_without_scale", "dropout_mask_per_rank"])
def test_merge_and_dropout_bugs_are_caught_at_pipeline_layouts(_tp2, impl, prop, where, verdict, sub):
    import importlib

    from harness.runs import Evidence

    check = importlib.import_module(f"harness.properties.{prop}").check
    result = check(Evidence(_executor(), _case(where, impl=impl, dropout=0.5)))
    assert result.verdict is verdict, result.findings
    assert sub in {f.check for f in result.findings if f.verdict.failing}


@pytest.mark.parametrize("saved", [PP2, VPP], ids=str)
def test_adapters_saved_by_stages_load_bit_for_bit_where_there_are_none(_tp2, saved):
    """A checkpoint written by pipeline stages (a list of chunks under virtual stages) loads at tp2 without
    stages: the adapters bit for bit, the logits the same, each adapter once in the file set."""
    from harness.properties.checkpoint import check
    from harness.runs import Evidence

    case = _case(saved, num_layers=saved.stages).with_(load_layout=ParallelLayout(tp=2))
    result = check(Evidence(_executor(), case))
    assert result.verdict is Verdict.PASS, result.findings
    assert any("adapter loaded at tp2" in c.location.quantity for c in result.comparisons)


def test_a_checkpoint_keyed_by_stage_local_layers_is_caught(_tp2):
    from harness.properties.checkpoint import check
    from harness.runs import Evidence

    case = _case(PP2, impl="tests.wrong_impls.ckpt_stage_local_layer").with_(load_layout=ParallelLayout(tp=2))
    result = check(Evidence(_executor(), case))
    assert result.verdict.failing and result.verdict is not Verdict.HARNESS, result.findings
    assert {f.check for f in result.findings if f.verdict.failing} & {"checkpoint_save", "checkpoint_keys"}


def test_switching_adapters_off_is_checked_through_the_schedule():
    from harness.properties.adapter_switch import check
    from harness.runs import Evidence

    assert check(Evidence(_executor(), _case(VPP, num_layers=4))).verdict is Verdict.PASS
    # Every adapter but the first layer's switched off: the second stage's logits never go back to the base.
    wrong = check(Evidence(_executor(), _case(PP2, impl="tests.wrong_impls.switch_leaves_first_layer_on",
                                             target_modules=["linear_fc2"])))
    assert wrong.verdict is Verdict.NUMERIC, wrong.findings


def test_bad_input_errors_name_the_whole_model_s_modules_on_every_stage():
    """A pattern selecting a module without an adapter raises naming it; on the second stage that is layer 1's
    (the stage's first layer), which an implementation matching stage-local names calls layer 0's."""
    from harness.properties.errors_spec import check
    from harness.runs import Evidence

    assert check(Evidence(_executor(), _case(VPP, num_layers=4))).verdict is Verdict.PASS
    wrong = check(Evidence(_executor(), _case(PP2, impl="tests.wrong_impls.pp_stage_local_names")))
    assert wrong.verdict is Verdict.CONTRACT
    assert any("decoder.layers.1." in f.message and f.check == "non_linear_target" for f in wrong.findings), wrong.findings


def test_activation_recompute_is_checked_on_every_stage():
    """The first stage's input does not require grad (a frozen embedding's output): an implementation that does
    not make a recomputed block's input require grad loses the first stage's adapter gradients."""
    from harness.properties.recompute import check
    from harness.runs import Evidence

    assert check(Evidence(_executor(), _case(VPP, num_layers=4))).verdict is Verdict.PASS
    wrong = check(Evidence(_executor(), _case(PP2, impl="tests.wrong_impls.recompute_frozen_input")))
    assert wrong.verdict.failing and wrong.verdict is not Verdict.HARNESS, wrong.findings


def _loop_case(layout, impl="lora.megatron", **loop):
    from harness.training import TrainingLoop

    return _case(layout, impl=impl, num_layers=layout.stages).with_(
        loop=TrainingLoop(**(dict(steps=2, micro_batches=2, optimizer="adam") | loop)))


@pytest.mark.parametrize("loop", [{}, dict(optimizer="sgd", bf16=True), dict(per_token_loss=True, overlap_grad_reduce=True)],
                         ids=["adam", "bf16", "per-token"])
def test_the_training_loop_runs_through_megatron_s_schedule_under_ddp(loop):
    """Two steps of two micro-batches, each stage's chunks in megatron's DDP, one optimizer over every chunk,
    finalize_model_grads over the stages: every step's held-out logits and adapters match the reference's."""
    from harness.properties.training import check_training
    from harness.runs import Evidence

    result = check_training(Evidence(_executor(), _loop_case(VPP, **loop)))
    assert result.verdict is Verdict.PASS, result.findings
    assert any("after step 2" in c.location.quantity for c in result.comparisons)


def test_a_gradient_buffer_reset_between_micro_batches_is_caught_at_a_pipeline_layout():
    from harness.properties.training import check_training
    from harness.runs import Evidence

    result = check_training(Evidence(_executor(), _loop_case(PP2, impl="tests.wrong_impls.ddp_grad_buffer_reset")))
    assert result.verdict is Verdict.NUMERIC, result.findings


def test_an_unwritable_checkpoint_folder_is_a_usage_error_before_any_rank_starts(tmp_path, monkeypatch):
    import tempfile

    # A file where the folder should be: no user, root included, can write under it.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    with pytest.raises(PlanError, match=r"checkpoint_roundtrip writes its checkpoints under .*not-a-folder.*TMPDIR"):
        Plan(2, 1)
    Plan(2, 1, properties=["forward_matches"])  # a run without the property does not need the folder


def test_more_micro_batches_than_stages_under_virtual_stages_train_as_the_reference():
    """Deep seed 1301: three micro-batches at tp1-pp2-vpp2 (padded to four, a multiple of pp, as megatron's
    interleaved schedule requires), where gloo's batched point-to-point mixed up in-flight activations until
    the harness switched to megatron's separate sends (``pipeline_config``)."""
    from harness.properties.training import check_training
    from harness.runs import Evidence

    result = check_training(Evidence(_executor(), _loop_case(VPP, micro_batches=3)))
    assert result.verdict is Verdict.PASS, result.findings


def test_megatron_bridge_matches_a_stage_s_local_names_and_the_harness_says_so():
    """Megatron-Bridge 0.6.2 walks each pipeline chunk from its root: '*.layers.0.*' adapts every stage's first
    layer. Numeric under its own contract (the logits are wrong), and named (stage_local_names)."""
    from harness import bridge

    if not bridge.bridge_installed():
        pytest.skip("megatron-bridge is not installed (ci/setup.sh installs it)")
    from harness.contract import capabilities_of
    from harness.properties.adapters_spec import check as adapters
    from harness.properties.forward import check as forward
    from harness.runs import Evidence

    case = _case(PP2, impl="megatron.bridge.peft.lora").with_(contract=capabilities_of("megatron.bridge.peft.lora").contract)
    assert case.contract == "bridge"
    ev = Evidence(_executor(), case)
    assert forward(ev).verdict is Verdict.NUMERIC
    named = adapters(ev)
    assert named.verdict is Verdict.CONTRACT
    assert any(f.check == "stage_local_names" and "decoder.layers.1.self_attention.linear_qkv" in f.message
               for f in named.findings)


def test_init_distributions_are_checked_on_every_stage():
    """The init model has one layer per stage; each stage's draws are gathered by global name and tested."""
    from hypothesis import settings

    from harness.driver import check_property

    one = settings(max_examples=1, database=None, deadline=None)
    good = check_property("init_follows_distribution", PP2, "lora.megatron", settings=one, family="gpt", seed=3,
                          designed=False)
    assert good.verdict is Verdict.PASS, good.error
    bad = check_property("init_follows_distribution", PP2, "tests.wrong_impls.init_wrong_distribution", settings=one,
                         family="gpt", seed=3, designed=False, shrink_budget=1)
    assert bad.verdict.failing, bad.error
