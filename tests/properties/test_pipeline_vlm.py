"""The VLM family at a pipeline layout: megatron's LLaVA split over two stages, the vision tower and the
projection on the first only; VLMLoRA's freezing judged per stage by the whole model's names, its optimizer
step taken through megatron-core's schedule."""

import functools

import pytest

from harness.families.vlm.case import VLMCase
from harness.families.vlm.model import VLMShape
from harness.layouts import ParallelLayout
from harness.results import Verdict

PP2 = ParallelLayout(pp=2)


def _case(impl="lora.megatron"):
    return VLMCase(shape=VLMShape(num_layers=2), seed=5, layout=PP2, impl=impl,
                   lora=dict(dim=2, alpha=2, target_modules=["*linear_qkv", "*linear_fc1"], exclude_modules=[],
                             dropout=0.0, lora_A_init_method="xavier", lora_B_init_method="xavier"))


@functools.lru_cache(maxsize=1)
def _executor():
    from harness.runs import Executor

    return Executor()


def _evidence(case):
    from harness.runs import Evidence

    return Evidence(_executor(), case)


def _check(case):
    from harness.properties.vlm_freezing import check

    return check(_evidence(case))


def test_lora_megatron_s_vlmlora_follows_spec_on_each_stage():
    ev = _evidence(_case())
    first, second = ev.impl
    # Stage 0 holds the vision tower, the projection and language layer 0; stage 1 language layer 1 by its
    # global number, no vision part.
    assert any(p.startswith("vision_model.") for p in first.extras.base.params)
    assert "vision_model.class_token" in first.extras.base.params
    assert not any(p.startswith(("vision_model.", "vision_projection.")) for p in second.extras.base.params)
    assert any(".layers.1." in p for p in second.extras.base.params)
    assert not any("language_model.decoder.layers.0." in p for p in second.extras.base.params)
    # The optimizer step ran through the schedule on both stages wherever a stage trains.
    assert sum(c.changed is not None for c in second.extras.combos) >= 12
    result = _check(_case())
    assert result.verdict is Verdict.PASS, result.findings


@pytest.mark.parametrize("impl, check", [
    # VLMLoRA assumes the model has its vision tower: the second stage never has one.
    ("tests.wrong_impls.vlm_none_part_crashes", "access"),
    ("tests.wrong_impls.vlm_projection_trainable", "trainable_set"),
])
def test_vlmlora_bugs_are_caught_on_a_stage(impl, check):
    result = _check(_case(impl))
    assert result.verdict is Verdict.CONTRACT
    assert check in {f.check for f in result.findings}, result.findings


def test_a_layer_pattern_means_the_whole_model_s_layer_in_every_access_form():
    """The first VLM pipeline run caught lora.megatron here: through a wrapper's ``.llava_model`` (no pipeline
    config on the wrapper itself) ``*.decoder.layers.0.*linear_fc1`` adapted the second stage's local layer 0,
    i.e. the model's layer 1. Each of the 16 combinations uses one of the three access forms."""
    case = _case().with_(lora=dict(_case().lora, target_modules=["*.decoder.layers.0.*linear_fc1", "*linear_proj"]))
    assert {c.access for c in _evidence(case).impl[1].extras.combos} == {"model", "list", "llava_model"}
    result = _check(case)
    assert result.verdict is Verdict.PASS, result.findings
