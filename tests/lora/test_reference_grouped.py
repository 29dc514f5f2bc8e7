"""lora.reference on grouped expert linears (num_gemms, weight0.., forward(x, m_splits)): values, grads, names, init, merge.

Most tests use a tiny duck-typed grouped linear defined here (no megatron, no
process group); one test adapts `harness.families.moe.model.TorchColumnParallelGroupedLinear`.
Every expected value is written out by hand as a per-expert loop.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora.reference.adapters as reference_adapters
import lora.reference.layers as reference_layers
from lora.reference import LoRA, LoRAAdapter, LoRAExpertAdapters, LoRAGroupedLinear, LoRALinear, LoRAMerge, merge_lora

N, H, FFN = 3, 6, 5
SPLITS = [2, 0, 3]  # expert 1 gets no token
FC1 = "decoder.layers.0.mlp.experts.linear_fc1"
FC2 = "decoder.layers.0.mlp.experts.linear_fc2"
PROJ = "decoder.layers.0.self_attention.linear_proj"


class DuckGroupedLinear(nn.Module):
    """What TE's GroupedLinear looks like to LoRA: num_gemms, weight{i} (out, in), forward(x, m_splits) -> (out, None)."""

    def __init__(self, n: int, fin: int, fout: int, dtype=torch.float64, bias: bool = False):
        super().__init__()
        self.num_gemms = n
        self.use_bias = bias
        for i in range(n):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.randn(fout, fin, dtype=dtype)))
            if bias:
                self.register_parameter(f"bias{i}", nn.Parameter(torch.randn(fout, dtype=dtype)))

    def forward(self, x, m_splits):
        splits = m_splits.tolist() if torch.is_tensor(m_splits) else list(m_splits)
        outs = []
        for i, block in enumerate(torch.split(x, splits)):
            b = getattr(self, f"bias{i}") if self.use_bias else None
            outs.append(F.linear(block, getattr(self, f"weight{i}"), b))
        return torch.cat(outs), None


class Experts(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.linear_fc1 = DuckGroupedLinear(N, H, FFN, dtype)
        self.linear_fc2 = DuckGroupedLinear(N, FFN, H, dtype)

    def forward(self, x, splits):
        h, _ = self.linear_fc1(x, splits)
        out, _ = self.linear_fc2(torch.relu(h), splits)
        return out


class Attention(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.linear_proj = nn.Linear(H, H, bias=False, dtype=dtype)


class MoEMLP(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.experts = Experts(dtype)


class Layer(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.self_attention = Attention(dtype)
        self.mlp = MoEMLP(dtype)


class Decoder(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.layers = nn.ModuleList([Layer(dtype)])


class Model(nn.Module):
    def __init__(self, dtype=torch.float64, topk=2):
        super().__init__()
        self.config = types.SimpleNamespace(moe_router_topk=topk)
        self.decoder = Decoder(dtype)

    def forward(self, x, splits):
        layer = self.decoder.layers[0]
        return layer.mlp.experts(layer.self_attention.linear_proj(x), splits)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Model(**kw)


def fc1_of(model):
    return model.decoder.layers[0].mlp.experts.linear_fc1


def set_adapter_values(wrapper, seed=1):
    """Non-zero A and B (B is zero-initialised), drawn from a private generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapper.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def blocks(x, splits):
    out, start = [], 0
    for n in splits:
        out.append(x[start : start + n])
        start += n
    return out


def expected_grouped(x, weights, As, Bs, scale, splits):
    """sum over experts of x_i @ W_i.T + scale * x_i @ A_i.T @ B_i.T, concatenated."""
    outs = []
    for i, xi in enumerate(blocks(x, splits)):
        outs.append(xi @ weights[i].T + scale * (xi @ As[i].T) @ Bs[i].T)
    return torch.cat(outs)


def adapter_mats(wrapper):
    """Per-expert lists (A_i, B_i); a shared adapter repeats its one pair."""
    ad = wrapper.adapter
    if isinstance(ad, LoRAExpertAdapters):
        return ([getattr(ad.linear_in, f"weight{i}") for i in range(N)],
                [getattr(ad.linear_out, f"weight{i}") for i in range(N)])
    return [ad.linear_in.weight] * N, [ad.linear_out.weight] * N


def base_weights(module):
    return [getattr(module, f"weight{i}") for i in range(module.num_gemms)]


# --------------------------------------------------------------- forward


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("splits_as_tensor", [False, True])
def test_forward_equals_per_expert_loop(share, splits_as_tensor):
    model = LoRA(target_modules=["linear_fc1"], dim=4, alpha=6, share_expert_adapters=share)(make_model())
    wrapper = fc1_of(model)
    assert isinstance(wrapper, LoRAGroupedLinear) and isinstance(wrapper, LoRALinear)
    assert isinstance(wrapper.adapter, LoRAAdapter if share else LoRAExpertAdapters)
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    splits = torch.tensor(SPLITS) if splits_as_tensor else SPLITS
    out = wrapper(x, splits)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    As, Bs = adapter_mats(wrapper)
    if share:
        assert all(a is As[0] for a in As)
    else:  # per-expert adapters are distinct values
        assert not torch.equal(As[0], As[2]) and not torch.equal(Bs[0], Bs[2])
    want = expected_grouped(x, base_weights(wrapper.to_wrap), As, Bs, 6 / 4, SPLITS)
    torch.testing.assert_close(out[0], want, rtol=1e-12, atol=1e-12)
    # The delta is not zero (B was set by hand), so the adapter really acts.
    base_only = torch.cat([xi @ w.T for xi, w in zip(blocks(x, SPLITS), base_weights(wrapper.to_wrap))])
    assert (out[0] - base_only).abs().max() > 1e-3


def test_bias_tuple_is_kept_and_delta_added_to_output():
    torch.manual_seed(0)
    base = DuckGroupedLinear(N, H, FFN, bias=True)
    holder = nn.Module()
    holder.linear_fc1 = base
    LoRA(target_modules=["linear_fc1"], dim=2, alpha=2)(holder)
    wrapper = holder.linear_fc1
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    out, bias = wrapper(x, SPLITS)
    assert bias is None
    A, B = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    want = torch.cat([
        xi @ getattr(base, f"weight{i}").T + getattr(base, f"bias{i}") + (xi @ A.T) @ B.T
        for i, xi in enumerate(blocks(x, SPLITS))
    ])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_lora_dtype_is_honoured_and_result_cast_back():
    model = LoRA(target_modules=["linear_fc1"], dim=4, alpha=4, lora_dtype=torch.float32,
                 share_expert_adapters=False)(make_model())
    wrapper = fc1_of(model)
    set_adapter_values(wrapper)
    assert all(p.dtype == torch.float32 for p in wrapper.adapter.parameters())
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    out, _ = wrapper(x, SPLITS)
    assert out.dtype == torch.float64
    As, Bs = adapter_mats(wrapper)
    deltas = [((xi.float() @ As[i].T) @ Bs[i].T * 1.0).double() for i, xi in enumerate(blocks(x, SPLITS))]
    want = torch.cat([xi @ w.T for xi, w in zip(blocks(x, SPLITS), base_weights(wrapper.to_wrap))]) + torch.cat(deltas)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_per_expert_dropout_in_training_only(position):
    model = LoRA(target_modules=["linear_fc1"], dim=4, alpha=4, dropout=0.5, dropout_position=position,
                 share_expert_adapters=False)(make_model())
    wrapper = fc1_of(model)
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    As, Bs = adapter_mats(wrapper)
    base = torch.cat([xi @ w.T for xi, w in zip(blocks(x, SPLITS), base_weights(wrapper.to_wrap))])
    torch.manual_seed(5)
    out, _ = wrapper(x, SPLITS)  # training mode
    torch.manual_seed(5)
    if position == "pre":
        xd = F.dropout(x, p=0.5, training=True)
        delta = torch.cat([(xi @ As[i].T) @ Bs[i].T for i, xi in enumerate(blocks(xd, SPLITS))])
    else:
        delta = torch.cat([(xi @ As[i].T) @ Bs[i].T for i, xi in enumerate(blocks(x, SPLITS))])
        delta = F.dropout(delta, p=0.5, training=True)
    torch.testing.assert_close(out, base + delta, rtol=1e-12, atol=1e-12)
    model.eval()
    out_eval, _ = wrapper(x, SPLITS)
    nodrop = torch.cat([(xi @ As[i].T) @ Bs[i].T for i, xi in enumerate(blocks(x, SPLITS))])
    torch.testing.assert_close(out_eval, base + nodrop, rtol=1e-12, atol=1e-12)


def test_bad_m_splits_is_a_value_error():
    model = LoRA(target_modules=["linear_fc1"], share_expert_adapters=False)(make_model())
    x = torch.randn(5, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="m_splits has 2 entries for 3 experts"):
        fc1_of(model)(x, [2, 3])  # the duck base accepts it; the per-expert adapters do not
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        reference_adapters._split_sizes([2, 0, 2], N, 5, "x")
    assert reference_adapters._split_sizes(torch.tensor([2, 0, 3]), N, 5, "x") == [2, 0, 3]


# ------------------------------------------------------------- gradients


@pytest.mark.parametrize("share", [True, False])
def test_gradients_of_adapters_and_input(share):
    scale = 6 / 4
    model = LoRA(target_modules=["linear_fc1"], dim=4, alpha=6, share_expert_adapters=share)(make_model())
    wrapper = fc1_of(model)
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64, requires_grad=True)
    out, _ = wrapper(x, SPLITS)
    probe = torch.randn(out.shape, dtype=torch.float64)
    (out * probe).sum().backward()
    As, Bs = adapter_mats(wrapper)
    Ws = base_weights(wrapper.to_wrap)
    xd = x.detach()
    # d/dA_i = scale * (P_i @ B_i).T @ x_i ; d/dB_i = scale * P_i.T @ (x_i @ A_i.T); dx_i = P_i @ (W_i + scale B_i A_i)
    gA = [scale * (pi @ Bs[i].detach()).T @ xi for i, (xi, pi) in enumerate(zip(blocks(xd, SPLITS), blocks(probe, SPLITS)))]
    gB = [scale * pi.T @ (xi @ As[i].detach().T) for i, (xi, pi) in enumerate(zip(blocks(xd, SPLITS), blocks(probe, SPLITS)))]
    gx = torch.cat([pi @ (Ws[i].detach() + scale * Bs[i].detach() @ As[i].detach())
                    for i, pi in enumerate(blocks(probe, SPLITS))])
    if share:
        torch.testing.assert_close(As[0].grad, sum(gA), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Bs[0].grad, sum(gB), rtol=1e-12, atol=1e-12)
    else:
        for i in range(N):
            torch.testing.assert_close(As[i].grad, gA[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(Bs[i].grad, gB[i], rtol=1e-12, atol=1e-12)
        # expert 1 has no token: zero gradient
        assert torch.count_nonzero(As[1].grad) == 0 and torch.count_nonzero(Bs[1].grad) == 0
    torch.testing.assert_close(x.grad, gx, rtol=1e-12, atol=1e-12)
    assert all(w.grad is None for w in Ws)  # frozen base


# ------------------------------------------------------------ names, freeze


def test_parameter_names_shared():
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=4)(make_model())
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{FC1}.adapter.linear_in.weight": (4, H),
        f"{FC1}.adapter.linear_out.weight": (FFN, 4),
        f"{FC2}.adapter.linear_in.weight": (4, FFN),
        f"{FC2}.adapter.linear_out.weight": (H, 4),
    }
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{m}.to_wrap.weight{i}" for m in (FC1, FC2) for i in range(N)} | {f"{PROJ}.weight"}
    assert model.training


def test_parameter_names_per_expert():
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=4, share_expert_adapters=False)(make_model())
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    want = {}
    for m, fin, fout in ((FC1, H, FFN), (FC2, FFN, H)):
        for i in range(N):
            want[f"{m}.adapter.linear_in.weight{i}"] = (4, fin)
            want[f"{m}.adapter.linear_out.weight{i}"] = (fout, 4)
    assert trainable == want


@pytest.mark.parametrize("share", [True, False])
def test_training_false_freezes_everything(share):
    model = LoRA(target_modules=["linear_fc1"], share_expert_adapters=share)(make_model(), training=False)
    assert isinstance(fc1_of(model), LoRAGroupedLinear)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


# ---------------------------------------------------------- normalize_moe_lora


@pytest.mark.parametrize("share", [True, False])
def test_normalize_moe_lora_rank_is_dim_over_topk(share):
    model = LoRA(target_modules=["linear_fc1", "linear_proj"], dim=8, alpha=4, normalize_moe_lora=True,
                 share_expert_adapters=share)(make_model(topk=2))
    wrapper = fc1_of(model)
    assert wrapper.adapter.dim == 4 and wrapper.adapter.scale == 1.0
    As, Bs = adapter_mats(wrapper)
    assert all(tuple(a.shape) == (4, H) for a in As) and all(tuple(b.shape) == (FFN, 4) for b in Bs)
    proj = model.decoder.layers[0].self_attention.linear_proj
    assert proj.adapter.dim == 8  # dense linear keeps dim
    # the scale alpha / (dim // topk) enters the output
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    want = expected_grouped(x, base_weights(wrapper.to_wrap), As, Bs, 4 / 4, SPLITS)
    torch.testing.assert_close(wrapper(x, SPLITS)[0], want, rtol=1e-12, atol=1e-12)


def test_normalize_moe_lora_errors():
    with pytest.raises(ValueError, match="divisible"):
        LoRA(target_modules=["linear_fc1"], dim=7, normalize_moe_lora=True)(make_model(topk=2))
    model = make_model()
    del model.config
    with pytest.raises(ValueError, match="moe_router_topk"):
        LoRA(target_modules=["linear_fc1"], dim=8, normalize_moe_lora=True)(model)


# ------------------------------------------------------------ exclude, idempotence


def test_exclude_mode_adapts_grouped_linears():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = LoRA(target_modules=[], exclude_modules=["linear_fc2"], dim=2)(make_model())
    assert isinstance(fc1_of(model), LoRAGroupedLinear)
    assert isinstance(model.decoder.layers[0].self_attention.linear_proj, LoRALinear)
    assert isinstance(model.decoder.layers[0].mlp.experts.linear_fc2, DuckGroupedLinear)
    assert reference_layers._is_linear_type(DuckGroupedLinear(2, 3, 4))
    # a wrapper forwards num_gemms to its base but is not itself a grouped linear
    assert fc1_of(model).num_gemms == N and not reference_layers._is_grouped_linear(fc1_of(model))


@pytest.mark.parametrize("share", [True, False])
def test_applying_twice_changes_nothing(share):
    cfg = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=4, share_expert_adapters=share)
    model = cfg(make_model())
    wrapper = fc1_of(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cfg(model)
    assert again is model and fc1_of(again) is wrapper
    assert isinstance(wrapper.to_wrap, DuckGroupedLinear)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert cfg.transform(wrapper, "linear_fc1", "decoder.layers.0.mlp.experts") is wrapper
    # exclude mode on an adapted model adds nothing either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRA(target_modules=[], exclude_modules=["linear_proj"])(model)
    assert set(model.state_dict()) == set(before)


# ------------------------------------------------------------------ init


def test_init_per_expert_draw_order_A0_B0_A1_B1():
    torch.manual_seed(0)
    model = Model()
    torch.manual_seed(123)
    LoRA(target_modules=["linear_fc1"], dim=4, lora_A_init_method="kaiming", lora_B_init_method="normal",
         share_expert_adapters=False)(model)
    wrapper = fc1_of(model)
    # The same draws with torch.nn.init, in the order A0, B0, A1, B1, A2, B2.
    torch.manual_seed(123)
    for i in range(N):
        A = torch.empty(4, H)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.empty(FFN, 4)
        nn.init.normal_(B, 0.0, 0.2)
        assert torch.equal(getattr(wrapper.adapter.linear_in, f"weight{i}"), A.double()), i
        assert torch.equal(getattr(wrapper.adapter.linear_out, f"weight{i}"), B.double()), i
    As, Bs = adapter_mats(wrapper)
    for i in range(N):
        for j in range(i + 1, N):
            assert not torch.equal(As[i], As[j]) and not torch.equal(Bs[i], Bs[j])


def test_init_shared_draws_A_then_B_once():
    torch.manual_seed(0)
    model = Model()
    torch.manual_seed(7)
    LoRA(target_modules=["linear_fc1"], dim=4, lora_A_init_method="xavier", lora_B_init_method="xavier_uniform")(model)
    after_lora = torch.rand(3)
    torch.manual_seed(7)
    A = torch.empty(4, H)
    nn.init.xavier_normal_(A)
    B = torch.empty(FFN, 4)
    nn.init.xavier_uniform_(B)
    wrapper = fc1_of(model)
    assert torch.equal(wrapper.adapter.linear_in.weight, A.double())
    assert torch.equal(wrapper.adapter.linear_out.weight, B.double())
    assert torch.equal(after_lora, torch.rand(3))  # nothing else was drawn


def test_default_init_per_expert_B_zero_so_output_unchanged():
    torch.manual_seed(0)
    plain = Model()
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], share_expert_adapters=False)(make_model())
    _, Bs = adapter_mats(fc1_of(model))
    assert all(torch.count_nonzero(b) == 0 for b in Bs)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    torch.testing.assert_close(model(x, SPLITS), plain(x, SPLITS), rtol=0, atol=0)


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_folds_into_every_expert_weight(share, dtype):
    model = LoRA(target_modules=["linear_fc1", "linear_fc2", "linear_proj"], dim=4, alpha=6,
                 share_expert_adapters=share)(make_model(dtype=dtype))
    wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrappers) == 3
    for k, m in enumerate(wrappers):
        set_adapter_values(m, seed=10 + k)
    model.eval()
    x = torch.randn(sum(SPLITS), H, dtype=dtype)
    with torch.no_grad():
        adapted = model(x, SPLITS)
    wrapper = fc1_of(model)
    base = wrapper.to_wrap
    As, Bs = adapter_mats(wrapper)
    want_w = [(w.detach().float() if dtype == torch.float32 else w.detach())
              + 1.5 * (Bs[i].detach().to(torch.float32 if dtype == torch.float32 else dtype)
                       @ As[i].detach().to(torch.float32 if dtype == torch.float32 else dtype))
              for i, w in enumerate(base_weights(base))]
    merged = merge_lora(model)
    assert merged is model and fc1_of(merged) is base
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any(".adapter." in n or ".to_wrap." in n for n, _ in merged.named_parameters())
    for i, w in enumerate(base_weights(base)):
        assert w.dtype == dtype
        assert torch.equal(w.detach(), want_w[i].to(dtype)), i
    with torch.no_grad():
        folded = merged(x, SPLITS)
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # float32: two layers of rounding
    torch.testing.assert_close(folded, adapted, rtol=tol, atol=tol)


def test_loramerge_transform_of_a_grouped_wrapper():
    model = LoRA(target_modules=["linear_fc1"], dim=2, alpha=2, share_expert_adapters=False)(make_model())
    wrapper = fc1_of(model)
    set_adapter_values(wrapper)
    As, Bs = adapter_mats(wrapper)
    want = [w.detach() + Bs[i].detach() @ As[i].detach() for i, w in enumerate(base_weights(wrapper.to_wrap))]
    base = LoRAMerge().transform(wrapper, "linear_fc1", "decoder.layers.0.mlp.experts")
    assert base is wrapper.to_wrap
    for i, w in enumerate(base_weights(base)):
        torch.testing.assert_close(w.detach(), want[i], rtol=0, atol=1e-14)


# --------------------------------------------------------------- sharding


class FakeGroup:
    pass


@pytest.mark.parametrize("attr", ["tp_group", "_tp_group"])
def test_sharded_grouped_linear_is_a_value_error(monkeypatch, attr):
    fake = FakeGroup()
    real = reference_layers._group_size
    monkeypatch.setattr(reference_layers, "_group_size", lambda g: 2 if g is fake else real(g))
    model = make_model()
    setattr(fc1_of(model), attr, fake)
    with pytest.raises(ValueError, match=r"linear_fc1.*lora\.megatron"):
        LoRA(target_modules=["linear_fc1"])(model)
    # size-1 and missing groups are fine
    model = make_model()
    fc1_of(model).tp_group = None
    assert isinstance(fc1_of(LoRA(target_modules=["linear_fc1"])(model)), LoRAGroupedLinear)
    # merging a wrapper whose base turned out sharded refuses too
    setattr(fc1_of(model).to_wrap, attr, fake)
    with pytest.raises(ValueError, match="tp_size"):
        merge_lora(model)


# ------------------------------------------------------- harness grouped linear


@pytest.mark.parametrize("share", [True, False])
def test_harness_torch_grouped_linear(share):
    pytest.importorskip("megatron.core")
    from harness.families.moe.model import MoEShape, TorchColumnParallelGroupedLinear, moe_config

    cfg = moe_config(MoEShape(num_experts=N), params_dtype=torch.float64)
    assert cfg.moe_router_topk == 2
    torch.manual_seed(0)
    lin = TorchColumnParallelGroupedLinear(
        N, H, FFN, config=cfg, init_method=torch.nn.init.normal_, bias=False, skip_bias_add=False,
        is_expert=True, pg_collection=types.SimpleNamespace(expt_tp=None),
    )
    root = nn.Module()
    root.decoder = nn.Module()
    root.decoder.layers = nn.ModuleList([nn.Module()])
    root.decoder.layers[0].mlp = nn.Module()
    root.decoder.layers[0].mlp.experts = nn.Module()
    root.decoder.layers[0].mlp.experts.linear_fc1 = lin
    LoRA(target_modules=["*.mlp.experts.linear_fc1"], dim=8, alpha=8, normalize_moe_lora=True,
         share_expert_adapters=share)(root)  # topk from the module's own config
    wrapper = root.decoder.layers[0].mlp.experts.linear_fc1
    assert isinstance(wrapper, LoRAGroupedLinear) and wrapper.to_wrap is lin
    assert wrapper.adapter.dim == 4
    set_adapter_values(wrapper)
    x = torch.randn(sum(SPLITS), H, dtype=torch.float64)
    out, bias = wrapper(x, SPLITS)
    assert bias is None
    As, Bs = adapter_mats(wrapper)
    want = expected_grouped(x, lin.weights(), As, Bs, 8 / 4, SPLITS)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    merged = merge_lora(root)
    torch.testing.assert_close(merged.decoder.layers[0].mlp.experts.linear_fc1(x, SPLITS)[0], want,
                               rtol=1e-12, atol=1e-12)
