"""Tests of harness.cpu: megatron-core on CPU + gloo, scoped to megatron, with working RNG streams.

Three things are proven here, by values:

* scoping: ``activate()`` rebinds ``torch`` only inside megatron-core modules
  (the global ``torch.cuda`` and every other module are untouched),
  ``deactivate()`` and ``cpu_mode()`` restore exactly the prior bindings;
* RNG: megatron's ``CudaRNGStatesTracker`` on CPU gives seeded, per-name,
  per-TP-rank streams whose forks save and restore the default stream, in
  process (world of one) and across two ranks at TP=2;
* necessity and correctness: megatron-core's ColumnParallelLinear,
  RowParallelLinear, TransformerLayer and GPTModel at TP=2 compute what the
  same full weights compute at TP=1 (outputs, input and weight gradients),
  and without the compatibility layer megatron's gather fails on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import cpu
from harness.layouts import ParallelLayout, destroy_megatron
from harness.sharding import unshard

mappings = pytest.importorskip("megatron.core.tensor_parallel.mappings")
import megatron.core.tensor_parallel.random as mrandom  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: E402

from tests.helpers import megatron_tasks as tasks  # noqa: E402

POOL_KW = dict(
    initializer="harness.cpu:rank_initializer",
    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
)
NO_GPU = not torch.cuda.is_available()
CPU = torch.device("cpu")

# The originals, captured before any test of this module can activate CPU mode.
ORIG_CURRENT_DEVICE = torch.cuda.current_device
ORIG_SET_RNG = mrandom.__dict__["_set_cuda_rng_state"] if not cpu.is_active() else None
ORIG_GET_RNG = mrandom.__dict__["_get_cuda_rng_state"] if not cpu.is_active() else None


def pool(world_size: int):
    from harness.pool import get_pool

    return get_pool(world_size, "gloo", **POOL_KW)


@pytest.fixture
def restore_cpu_mode():
    """Leave CPU mode as the test found it, whatever the test did."""
    was_active = cpu.is_active()
    yield
    if was_active:
        cpu.activate()
    else:
        cpu.deactivate()


@pytest.fixture
def inactive(restore_cpu_mode):
    cpu.deactivate()
    if ORIG_SET_RNG is None:
        pytest.skip("CPU mode was active when this module was imported; originals unknown")


# ------------------------------------------------------------------ scoping


def test_activate_redirects_cuda_only_inside_megatron(inactive):
    assert mappings.torch is torch
    cpu.activate()
    assert cpu.is_active()
    # Inside megatron: torch.cuda is the CPU stand-in.
    assert mappings.torch is not torch
    assert mappings.torch.cuda is cpu.CUDA_SHIM
    assert mappings.torch.cuda.current_device() == CPU
    # The tensor factories put what megatron asks on 'cuda' on the CPU (its DDP and optimizers do),
    # and are the real ones otherwise; everything else on the proxy is the real torch.
    assert mappings.torch.empty.__wrapped__ is torch.empty
    assert mappings.torch.empty(2, device="cuda").device == CPU
    assert mappings.torch.zeros(2, dtype=torch.float64).dtype == torch.float64
    assert mappings.torch.matmul is torch.matmul
    assert mappings.torch.distributed is torch.distributed
    assert mappings.torch.cuda.is_available is torch.cuda.is_available
    # Outside megatron: untouched.
    assert torch.cuda.current_device is ORIG_CURRENT_DEVICE
    assert torch.cuda.current_device.__module__ == "torch.cuda"
    import harness.sharding
    import lora.megatron.dense_adapters

    assert harness.sharding.torch is torch
    assert lora.megatron.dense_adapters.torch is torch
    if NO_GPU:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.cuda.current_device()
    # megatron's own RNG helpers are replaced by CPU ones.
    assert mrandom._set_cuda_rng_state is not ORIG_SET_RNG
    assert mrandom._get_cuda_rng_state is not ORIG_GET_RNG


def test_deactivate_restores_every_binding(inactive):
    cpu.activate()
    cpu.activate()  # idempotent: the second call must not record the proxy as an original
    cpu.deactivate()
    assert not cpu.is_active()
    assert mappings.torch is torch
    assert mrandom.torch is torch
    assert mrandom._set_cuda_rng_state is ORIG_SET_RNG
    assert mrandom._get_cuda_rng_state is ORIG_GET_RNG
    import sys

    leftovers = [
        name
        for name, mod in sys.modules.items()
        if name.startswith("megatron.core") and mod is not None and isinstance(getattr(mod, "torch", None), type(cpu._TORCH_PROXY))
    ]
    assert leftovers == []
    with pytest.raises(RuntimeError, match="activate"):
        cpu.patch_loaded_modules()


def test_cpu_mode_restores_inactive_state(inactive):
    with cpu.cpu_mode():
        assert cpu.is_active()
        assert mappings.torch.cuda.current_device() == CPU
    assert not cpu.is_active()
    assert mappings.torch is torch
    assert mrandom._set_cuda_rng_state is ORIG_SET_RNG
    with pytest.raises(KeyError):
        with cpu.cpu_mode():
            raise KeyError("inside")
    assert not cpu.is_active()
    assert mappings.torch is torch


def test_cpu_mode_keeps_active_state(restore_cpu_mode):
    cpu.activate()
    proxy = mappings.torch
    with cpu.cpu_mode():
        assert mappings.torch is proxy
    assert cpu.is_active()
    assert mappings.torch is proxy
    assert mappings.torch.cuda.current_device() == CPU


# ---------------------------------------------------------- RNG, in process


@pytest.fixture
def world_of_one(tmp_path, restore_cpu_mode):
    if dist.is_initialized():
        pytest.skip("a torch.distributed default group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/s", rank=0, world_size=1)
    try:
        ParallelLayout().initialize_megatron(1)
        yield
    finally:
        destroy_megatron()
        dist.destroy_process_group()


def _forked_mask(seed: int, name: str = "model-parallel-rng") -> torch.Tensor:
    cpu.seed_model_parallel(seed)
    with get_cuda_rng_tracker().fork(name):
        return tasks.dropout_mask()


def _mask_after_manual_seed(seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tasks.dropout_mask()


def test_forked_dropout_is_reproducible_and_seeded(world_of_one):
    a = _forked_mask(11)
    assert cpu.is_active()  # seed_model_parallel enters CPU mode on a machine without GPU
    b = _forked_mask(11)
    c = _forked_mask(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.3 < a.float().mean().item() < 0.7
    # megatron's semantics: the model-parallel stream is seeded with seed + 2718 + tp_rank,
    # the data-parallel stream and the default stream with seed itself.
    assert torch.equal(a, _mask_after_manual_seed(11 + 2718))
    assert torch.equal(_forked_mask(11, "data-parallel-rng"), _mask_after_manual_seed(11))


def test_forked_stream_differs_from_default(world_of_one):
    cpu.seed_model_parallel(5)
    default = tasks.dropout_mask()
    forked = _forked_mask(5)
    assert not torch.equal(default, forked)
    assert torch.equal(default, _mask_after_manual_seed(5))


def test_fork_saves_and_restores_both_streams(world_of_one):
    cpu.seed_model_parallel(7)
    undisturbed = [tasks.dropout_mask() for _ in range(2)]

    cpu.seed_model_parallel(7)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        first = tasks.dropout_mask()
        torch.rand(1000)  # advance the forked stream a lot
    after_fork = [tasks.dropout_mask() for _ in range(2)]
    # The default stream continues as if no fork had happened.
    assert torch.equal(after_fork[0], undisturbed[0])
    assert torch.equal(after_fork[1], undisturbed[1])
    # The forked stream continues where it stopped, instead of restarting.
    with tracker.fork():
        second = tasks.dropout_mask()
    assert not torch.equal(first, second)
    cpu.seed_model_parallel(7)
    with get_cuda_rng_tracker().fork():  # seeding makes a new tracker
        tasks.dropout_mask()
        torch.rand(1000)
        continued = tasks.dropout_mask()
    assert torch.equal(second, continued)


# ---------------------------------------------------------- RNG, two ranks


def test_streams_across_tp_ranks():
    r0, r1 = pool(2).run(tasks.rng_streams, 21)
    assert r0["active"] and r1["active"]
    assert (r0["tp"], r0["tp_rank"], r1["tp_rank"]) == (2, 0, 1)
    # Model-parallel stream: a different seeded stream on each TP rank.
    assert not torch.equal(r0["mp"], r1["mp"])
    assert torch.equal(r0["mp"], _mask_after_manual_seed(21 + 2718))
    assert torch.equal(r1["mp"], _mask_after_manual_seed(21 + 2718 + 1))
    # Data-parallel and default streams: the same on both TP ranks.
    assert torch.equal(r0["dp"], r1["dp"])
    assert torch.equal(r0["default"], r1["default"])
    assert torch.equal(r0["default"], _mask_after_manual_seed(21))
    # Forking restored the default stream on both ranks.
    for r in (r0, r1):
        assert torch.equal(r["default_after"], r["default"])
        assert not torch.equal(r["mp"], r["default"])


# ------------------------------------------- megatron-core layers at TP=2


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", ["column", "row", "layer", "gpt"])
def test_megatron_module_at_tp2_matches_tp1(kind):
    seed = 3
    (ref,) = pool(1).run(tasks.megatron_forward_backward, kind, seed)
    ranks = pool(2).run(tasks.megatron_forward_backward, kind, seed)
    assert ref["tp"] == 1 and [r["tp"] for r in ranks] == [2, 2]
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    if kind in ("column", "row"):
        # TP=1 itself is the plain affine map of the full weights.
        w, b, x = ref["weights"]["weight"], ref["weights"]["bias"], ref["x"]
        _close(ref["output"], x @ w.T + b, "TP=1 output vs x @ W.T + b")
    sharded_names = 0
    for r in ranks:
        _close(r["output"], ref["output"], f"{kind} output on TP rank {r['tp_rank']}")
        _close(r["input_grad"], ref["input_grad"], f"{kind} input gradient on TP rank {r['tp_rank']}")
        assert set(r["grads"]) == set(ref["grads"])
    for name, full_grad in ref["grads"].items():
        part = ranks[0]["parts"][name]
        sharded_names += part.dim is not None
        full_weight = unshard([r["weights"][name] for r in ranks], part)
        _close(full_weight, ref["weights"][name], f"{kind} weight {name} ({part.describe()})")
        if full_grad is None:
            assert all(r["grads"][name] is None for r in ranks), name
            continue
        if part.dim is None:
            for r in ranks:
                _close(r["grads"][name], full_grad, f"{kind} replicated grad {name} on TP rank {r['tp_rank']}")
        else:
            got = unshard([r["grads"][name] for r in ranks], part)
            _close(got, full_grad, f"{kind} grad {name} ({part.describe()})")
    assert sharded_names >= 1  # TP=2 really sharded something


@pytest.mark.skipif(not NO_GPU, reason="with a GPU megatron's CUDA calls succeed")
def test_gather_fails_on_cpu_without_the_compat_layer():
    seed = 4
    results = pool(2).run(tasks.gather_without_compat, seed)
    expected = pool(2).run(tasks.megatron_forward_backward, "column", seed)
    for res, exp in zip(results, expected):
        assert res["was_active"] is True and res["active_during"] is False and res["active_after"] is True
        err = res["error"]
        assert err is not None, "megatron's gather ran on CPU without harness.cpu: the layer would be unnecessary"
        assert err["type"] == "RuntimeError"
        assert "CUDA" in err["message"] or "NVIDIA" in err["message"]
        assert any(f.endswith("megatron/core/tensor_parallel/mappings.py") for f in err["files"])
        assert err["files"][-1].endswith("torch/cuda/__init__.py")
        # Re-activated, the same layer gives the right output.
        _close(res["output_after"], exp["output"], "gathered output after re-activation")


def test_megatron_optimizer_groups_are_the_gloo_groups_for_a_while_only():
    """megatron's optimizer reads gloo copies of the data-parallel groups; on a gloo world the groups
    are lent as the copies inside harness.megatron_state.gloo_groups_as_built, and taken back after."""
    for rank in pool(2).run(tasks.gloo_copies_aliased):
        assert rank == {"before": "missing", "inside_size": 2, "inside_is_group": True, "expert_inside": True,
                        "after": True, "destroyed": True}, rank
