"""Sequence parallelism for dense models on CPU: the norm, the GPT, and lora.megatron's adapters.

Proven by values, in float64 for the norm and float32 for the models:

* ``harness.families.gpt.model.SequenceParallelNorm`` (RMSNorm and LayerNorm) equals the
  plain torch norm forward and backward, whether it sees the whole sequence
  or one shard at a time; on 2 ranks, each normalising its sequence shard,
  the gathered outputs and input gradients equal the full norm's, and the
  weight gradients equal it only once summed over TP (which is why the
  weights carry ``sequence_parallel``);
* ``build_gpt(shape, tp=2, sequence_parallel=True)`` computes what TP=1
  computes on the same full weights: logits, the sequence-gathered input
  gradient, every sharded weight gradient (unsharded) and every norm
  gradient (summed over TP);
* lora.megatron at TP=2 with SP and LoRA on all four linears equals
  lora.megatron at TP=1 on the same full base and adapter weights: logits,
  input gradient and every adapter gradient (gathered per SPEC's TP table);
  likewise with ``a2a_experimental``;
* the checks can fail: a row adapter that does not split its output to the
  sequence shard (shape error) or that reduce-scatters it (t times the
  delta), and a column adapter whose input gather splits instead of
  reduce-scattering its gradient (right forward, wrong input gradient), are
  caught.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from harness.sharding import unshard  # noqa: E402
from tests.helpers import megatron_tasks as tasks  # noqa: E402

POOL_KW = dict(
    initializer="harness.cpu:rank_initializer",
    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
)
SEED = 29
R = 4
LORA_KW = dict(target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], dim=R, alpha=8)
FOUR = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def pool(world_size: int):
    from harness.pool import get_pool

    return get_pool(world_size, "gloo", **POOL_KW)


def _close(actual, expected, what, tol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ the norm


def _plain_norm(normalization, weights, x):
    h = x.shape[-1]
    if normalization == "RMSNorm":
        return torch.nn.functional.rms_norm(x, (h,), weights["weight"], eps=1e-5)
    return torch.nn.functional.layer_norm(x, (h,), weights["weight"], weights["bias"], eps=1e-5)


def _plain_norm_grads(normalization, weights, x_full, probe_full):
    w = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
    x = x_full.clone().requires_grad_(True)
    out = _plain_norm(normalization, w, x)
    (out * probe_full).sum().backward()
    return out.detach(), x.grad, {n: t.grad for n, t in w.items()}


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sp_norm_in_process_equals_plain_norm_on_shards(normalization):
    from harness.families.gpt.model import SequenceParallelNorm, transformer_config, GPTShape

    cfg = transformer_config(GPTShape(), tp=2, sequence_parallel=True, params_dtype=torch.float64, normalization=normalization)
    norm = SequenceParallelNorm(config=cfg, hidden_size=8, eps=1e-5)
    assert type(norm).__name__ == normalization
    names = {n for n, _ in norm.named_parameters()}
    assert names == ({"weight"} if normalization == "RMSNorm" else {"weight", "bias"})
    # The dtype megatron's WrappedTorchNorm gives (it ignores params_dtype too).
    assert all(p.dtype == torch.get_default_dtype() for p in norm.parameters())
    norm = norm.double()
    assert all(p.sequence_parallel is True and p.dtype == torch.float64 for p in norm.parameters())
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(tuple(p.shape), generator=g, dtype=torch.float64) * 0.1 + 1 for n, p in norm.named_parameters()}
    with torch.no_grad():
        for n, p in norm.named_parameters():
            p.copy_(weights[n])
    x_full = torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    probe = torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    ref_out, ref_dx, ref_dw = _plain_norm_grads(normalization, weights, x_full, probe)
    # Shard by shard (what each SP rank does), accumulating the weight gradient.
    outs, dxs = [], []
    for xs, ps in zip(torch.chunk(x_full, 3), torch.chunk(probe, 3)):
        xs = xs.clone().requires_grad_(True)
        out = norm(xs)
        (out * ps).sum().backward()
        outs.append(out.detach())
        dxs.append(xs.grad)
    _close(torch.cat(outs), ref_out, "output", 1e-12)
    _close(torch.cat(dxs), ref_dx, "input grad", 1e-12)
    for n, p in norm.named_parameters():
        _close(p.grad, ref_dw[n], f"{n} grad (accumulated over shards)", 1e-12)


def test_megatron_torch_norm_refuses_sequence_parallelism():
    # Why SequenceParallelNorm exists.
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from harness.families.gpt.model import GPTShape, transformer_config

    cfg = transformer_config(GPTShape(), tp=2, sequence_parallel=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config=cfg, hidden_size=8)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sp_norm_on_two_ranks_needs_the_tp_sum_of_weight_grads(normalization):
    ranks = pool(2).run(tasks.sp_norm, SEED, normalization)
    r0 = ranks[0]
    ref_out, ref_dx, ref_dw = _plain_norm_grads(normalization, r0["weights"], r0["x_full"], r0["probe_full"])
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    assert all(r["type"] == normalization for r in ranks)
    assert all(set(r["sp_flags"].values()) == {True} for r in ranks)
    _close(torch.cat([r["output"] for r in ranks]), ref_out, "sequence-gathered output", 1e-12)
    _close(torch.cat([r["input_grad"] for r in ranks]), ref_dx, "sequence-gathered input grad", 1e-12)
    for name, full in ref_dw.items():
        _close(sum(r["grads"][name] for r in ranks), full, f"{name} grad summed over TP", 1e-12)
        # Each rank alone holds only its tokens' part.
        for r in ranks:
            assert not torch.allclose(r["grads"][name], full), f"{name} grad of rank {r['tp_rank']} alone is complete?"


# -------------------------------------------------------------- the base GPT


def _check_base_grads(ref, ranks):
    sp_names = set(ranks[0]["sp_params"])
    assert sp_names, "no parameter carries sequence_parallel"
    assert all(".layernorm" in f".{n}" or "layernorm" in n for n in sp_names), sp_names
    sharded = 0
    for name, full_grad in ref["grads"].items():
        got = [r["grads"][name] for r in ranks]
        if full_grad is None:
            assert all(g is None for g in got), name
            continue
        part = ranks[0]["parts"][name]
        if name in sp_names:
            assert part.dim is None, name
            _close(sum(got), full_grad, f"SP norm grad {name} summed over TP")
            assert not torch.allclose(got[0], full_grad, rtol=1e-5, atol=1e-5), f"{name}: rank 0 alone is complete?"
        elif part.dim is None:
            for r, g in zip(ranks, got):
                _close(g, full_grad, f"replicated grad {name} on TP rank {r['tp_rank']}")
        else:
            sharded += 1
            _close(unshard(got, part), full_grad, f"grad {name} ({part.describe()})")
    assert sharded >= 5


def _check_outputs(ref, ranks, shape_s):
    for r in ranks:
        assert r["error"] is None, r["error"]
        assert r["local_input_shape"][0] == shape_s // 2  # each rank got its sequence shard
        _close(r["logits"], ref["logits"], f"logits on TP rank {r['tp_rank']}")
    _close(torch.cat([r["input_grad"] for r in ranks], dim=0), ref["input_grad"], "sequence-gathered input grad")


def test_build_gpt_sequence_parallel_at_tp2_matches_tp1():
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True)
    assert ref["error"] is None and ref["sp_params"] == []
    for r in ranks:
        assert r["norm_types"] == ["RMSNorm"]
        assert r["logits"].shape == ref["logits"].shape  # (b, s, vocab), gathered over sequence and TP
    _check_outputs(ref, ranks, 8)
    # Layer norms and the final norm: 2 layers x 2 + 1, one weight each.
    assert len(ranks[0]["sp_params"]) == 5
    _check_base_grads(ref, ranks)


def test_build_gpt_without_sequence_parallel_is_unchanged():
    # The default path keeps megatron's own WrappedTorchNorm (torch.nn.RMSNorm) and marks nothing.
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, False)
    for r in ranks:
        assert r["sp_params"] == [] and r["local_input_shape"][0] == 8
        _close(r["logits"], ref["logits"], "logits at TP=2 without SP")


# ------------------------------------------------------------------ adapters


def _check_adapter_grads(ref, ranks):
    layout = ranks[0]["adapter_layout"]
    names = sorted(layout)
    assert len(names) == 2 * 4 * 2  # A and B of four linears in two layers
    assert sorted(ref["grads"]) == names == sorted(ranks[0]["grads"])  # only adapters train
    for name in names:
        _wname, part, full_shape = layout[name]
        got = unshard([r["grads"][name] for r in ranks], part)
        assert tuple(got.shape) == tuple(full_shape), name
        assert ref["grads"][name].abs().max() > 0, name
        _close(got, ref["grads"][name], f"adapter grad {name} ({part.describe()})")
    for module in FOUR:
        assert any(module in n for n in names), module


@pytest.mark.parametrize("a2a", [False, True])
def test_lora_sequence_parallel_at_tp2_matches_tp1(a2a):
    kw = dict(LORA_KW, a2a_experimental=a2a)
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False, kw)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, kw)
    assert ref["error"] is None
    _check_outputs(ref, ranks, 8)
    _check_adapter_grads(ref, ranks)
    # The adapters really contribute: the base model's logits differ.
    (base,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False)
    assert not torch.allclose(base["logits"], ref["logits"], rtol=1e-3, atol=1e-3)


def test_lora_a2a_equals_the_gather_and_split_path():
    plain = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, dict(LORA_KW, a2a_experimental=False))
    a2a = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, dict(LORA_KW, a2a_experimental=True))
    for p, q in zip(plain, a2a):
        _close(q["logits"], p["logits"], "logits a2a vs gather+split")
        _close(q["input_grad"], p["input_grad"], "input grad a2a vs gather+split")
        for name, g in p["grads"].items():
            _close(q["grads"][name], g, f"{name} a2a vs gather+split")


def test_lora_sequence_parallel_non_gated_mlp():
    kw = dict(LORA_KW)
    shape_kw = {"gated_linear_unit": False}
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False, kw, shape_kw)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, kw, shape_kw)
    _check_outputs(ref, ranks, 8)
    _check_adapter_grads(ref, ranks)


# ------------------------------------------------------ the checks can fail


def test_row_adapter_without_sequence_split_is_a_shape_error():
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, LORA_KW, None, "no_scatter")
    for r in ranks:
        err = r["error"]
        assert err is not None, "a row adapter adding (s, b, out) to the base's (s/t, b, out) ran"
        assert err["type"] == "RuntimeError" and "size of tensor" in err["message"], err


def test_row_adapter_reduce_scattered_instead_of_split_is_caught():
    # B's output is already the full sum, identical on every rank; reduce-
    # scattering it multiplies the delta by t. The comparison must see that.
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False, LORA_KW)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, LORA_KW, None, "reduce_scatter")
    for r in ranks:
        assert r["error"] is None, r["error"]
    with pytest.raises(AssertionError, match="logits"):
        _check_outputs(ref, ranks, 8)
    # ...and the healthy adapter, re-run on the same pool, is right again (the patch was undone).
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, LORA_KW)
    _check_outputs(ref, ranks, 8)


def test_column_adapter_gather_without_gradient_sum_is_caught():
    # Forward is unchanged (a gather is a gather); only the backward differs:
    # the input gradient check must see it.
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False, LORA_KW)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, LORA_KW, None, "gather_split_grad")
    for r in ranks:
        assert r["error"] is None, r["error"]
        _close(r["logits"], ref["logits"], "logits (forward unaffected)")
    with pytest.raises(AssertionError, match="input grad"):
        _check_outputs(ref, ranks, 8)


# ------------------------------------------------------------- more coverage


def test_lora_on_the_output_layer_under_sequence_parallelism():
    # The output layer is a column base that gathers the sequence and the vocab.
    kw = dict(LORA_KW, target_modules=list(LORA_KW["target_modules"]) + ["output_layer"])
    (ref,) = pool(1).run(tasks.gpt_sp_forward_backward, SEED, False, kw)
    ranks = pool(2).run(tasks.gpt_sp_forward_backward, SEED, True, kw)
    _check_outputs(ref, ranks, 8)
    layout = ranks[0]["adapter_layout"]
    names = sorted(layout)
    assert "output_layer.adapter.linear_in.weight" in names
    for name in names:
        got = unshard([r["grads"][name] for r in ranks], layout[name][1])
        _close(got, ref["grads"][name], f"adapter grad {name}")


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_under_sequence_parallelism(position):
    kw = dict(LORA_KW, dropout=0.5, dropout_position=position, lora_B_init_method="normal")
    for r in pool(2).run(tasks.gpt_sp_dropout, SEED, kw):
        assert torch.equal(r["eval1"], r["no_dropout"])
        assert not torch.allclose(r["train1"], r["eval1"])
        # Successive training steps draw fresh masks (nested forks of the
        # model-parallel stream continue it rather than restart it).
        assert not torch.allclose(r["train1"], r["train2"])
