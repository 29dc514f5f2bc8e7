"""NCCL and Transformer Engine paths: run where CUDA GPUs are present, skip with the reason otherwise.

``ci/gpu_check.sh`` runs this file plus ``lora-harness verify --backend nccl``
on a GPU machine. On CPU every test here is skipped before any rank starts
(so the normal suite pays nothing for it). What runs on a GPU box:

* NCCL collectives: every registered property at TP=2 on the nccl backend
  (2 GPUs), dense; and the MoE properties at TP=2 (sequence parallel).
* Transformer Engine linears (megatron-core 0.19.2's ``TEColumnParallelLinear``,
  ``TERowParallelLinear``, ``TELayerNormColumnParallelLinear``) adapted by
  ``lora.megatron``: forward equals ``lora.reference`` on a plain layer with
  the same full weights and adapters, at TP = the number of GPUs (1 or 2).
  ``lora.megatron`` has no adapter for TE linears yet (it raises the
  contract's ``TypeError`` naming the type): those tests are strict xfails
  on ``TypeError``, so the day it adapts them they must pass, and the xfail
  must go.
* TE grouped experts (megatron's ``TEGroupedMLP`` on TE's grouped linears):
  forward of lora.megatron equals lora.reference's (world size 1), shared
  and per-expert adapters.
"""

import importlib.util

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"NCCL at TP=2 needs 2 CUDA GPUs; this machine has {GPUS} (CPU runs use gloo)"
)
needs_te = pytest.mark.skipif(
    not HAVE_TE or GPUS < 1,
    reason=(
        f"Transformer Engine paths need transformer_engine and a CUDA GPU; "
        f"transformer_engine {'installed' if HAVE_TE else 'not installed'}, {GPUS} GPU(s)"
    ),
)

TE_NOT_ADAPTED = pytest.mark.xfail(
    raises=TypeError,
    strict=True,
    reason="lora.megatron has no adapter for Transformer Engine linears yet (the contract's TypeError naming the type)",
)


def _nccl_pool(world_size):
    from harness.pool import get_pool

    return get_pool(world_size, "nccl", initializer="harness.cpu:rank_initializer",
                    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"))


def _props(family):
    from harness.properties import registry

    return [name for name, prop in registry().items() if prop.skip_reason(family, _layout(family), _caps()) is None]


def _layout(family):
    from harness.layouts import ParallelLayout

    return ParallelLayout(tp=2, sp=family == "moe")


def _caps():
    from harness.contract import capabilities_of

    return capabilities_of("lora.megatron", None)


# ------------------------------------------------------------------ NCCL ---


@needs_two_gpus
@pytest.mark.parametrize("family", ["gpt", "moe"])
def test_properties_hold_on_nccl(family):
    from hypothesis import settings

    from harness.driver import check_property
    from harness.runs import Executor

    executor = Executor(backend="nccl")
    failures = []
    for prop in _props(family):
        outcome = check_property(prop, _layout(family), "lora.megatron", family=family, executor=executor,
                                 settings=settings(max_examples=10 if family == "gpt" else 5, database=None, deadline=None))
        assert outcome.examples > 0 or outcome.verdict.value == "skipped", prop
        if not outcome.passed:
            failures.append(f"{prop}: {outcome.error}")
    assert not failures, "\n".join(failures)


@needs_two_gpus
def test_nccl_ranks_compute_on_their_own_gpu():
    from tests.helpers import gpu_tasks

    ranks = _nccl_pool(2).run(gpu_tasks.device_and_all_reduce)
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert [r["sum"] for r in ranks] == [1.0, 1.0]


# ------------------------------------------------------ Transformer Engine ---


@needs_te
@TE_NOT_ADAPTED
@pytest.mark.parametrize("kind", ["column", "row", "layernorm_column"])
def test_te_linear_forward_equals_reference(kind):
    from tests.helpers import gpu_tasks

    from harness.pool import RankTaskError

    try:
        ranks = _nccl_pool(min(GPUS, 2)).run(gpu_tasks.te_linear_forward, kind, 0)
    except RankTaskError as exc:
        # The contract's refusal, raised on every rank, is the parent's TypeError (the strict xfail).
        if exc.errors and all(etype == "TypeError" for etype, _, _ in exc.errors.values()):
            raise TypeError(next(iter(exc.errors.values()))[1]) from exc
        raise
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["out"], r["expected"], rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {kind}: {m}")


@needs_te
@pytest.mark.parametrize("share", [True, False], ids=["shared-adapter", "per-expert"])
def test_te_grouped_experts_forward_equals_reference(share):
    from tests.helpers import gpu_tasks

    (r,) = _nccl_pool(1).run(gpu_tasks.te_grouped_experts_forward, 0, share)
    assert r["experts_type"] == "TEGroupedMLP"
    impl, ref = r["adapters"]["impl"], r["adapters"]["reference"]
    assert sorted(impl) == sorted(ref), (sorted(impl), sorted(ref))
    for name in impl:
        torch.testing.assert_close(impl[name], ref[name], msg=lambda m: f"initial adapter {name}: {m}")
    torch.testing.assert_close(r["out"], r["expected"], rtol=1e-4, atol=1e-5)


@needs_te
def test_te_linears_are_linear_type_and_refused_clearly():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401

    from lora.megatron.matching import is_linear_type
    from lora.megatron import LoRA

    te = pytest.importorskip("transformer_engine.pytorch")
    layer = te.Linear(8, 8)
    assert is_linear_type(layer)
    with pytest.raises(TypeError, match="has no LoRA adapter"):
        LoRA(target_modules=[], exclude_modules=["nothing"])(torch.nn.Sequential(layer))
