"""NCCL and Transformer Engine paths: run where a GPU is present, skip with the reason otherwise."""

import importlib.util

import pytest
import torch
from hypothesis import settings

from harness.layouts import ParallelLayout
from harness.driver import check_property
from harness.properties import registry
from harness.runs import Executor

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"NCCL at TP=2 needs 2 CUDA GPUs; this machine has {GPUS} (CPU runs use gloo)"
)
needs_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None or GPUS < 1,
    reason="Transformer Engine is not installed or has no CUDA GPU to import on",
)


@needs_two_gpus
@pytest.mark.parametrize("prop", list(registry()))
def test_properties_hold_on_nccl(prop):
    outcome = check_property(
        prop, ParallelLayout(tp=2), "lora.megatron", settings=settings(max_examples=10, database=None), executor=Executor(backend="nccl")
    )
    assert outcome.passed, outcome.error


@needs_te
def test_te_linears_are_linear_type_and_refused_clearly():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401

    from lora.megatron._base import is_linear_type
    from lora.megatron import LoRA

    te = pytest.importorskip("transformer_engine.pytorch")
    layer = te.Linear(8, 8)
    assert is_linear_type(layer)
    with pytest.raises(TypeError, match="has no LoRA adapter"):
        LoRA(target_modules=[], exclude_modules=["nothing"])(torch.nn.Sequential(layer))
