"""Tests of lora.reference on plain torch models: math, dropout, dtypes, matching, freezing, VLM, merge."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora._spec import INIT_METHODS
from lora.reference import LoRA, LoRAAdapter, LoRALinear, LoRAMerge, VLMLoRA, merge_lora


def is_adapter_wrapper(module) -> bool:
    """What the harness calls a wrapper (harness.sharding.adapter_modules): has `to_wrap` and `adapter`."""
    return hasattr(module, "to_wrap") and hasattr(module, "adapter")

# ---------------------------------------------------------------- tiny models


class Attention(nn.Module):
    def __init__(self, h: int, dtype=torch.float32):
        super().__init__()
        self.linear_qkv = nn.Linear(h, 3 * h, dtype=dtype)
        self.linear_proj = nn.Linear(3 * h, h, bias=False, dtype=dtype)

    def forward(self, x):
        return self.linear_proj(self.linear_qkv(x))


class MLP(nn.Module):
    def __init__(self, h: int, dtype=torch.float32):
        super().__init__()
        self.linear_fc1 = nn.Linear(h, 2 * h, dtype=dtype)
        self.linear_fc2 = nn.Linear(2 * h, h, dtype=dtype)

    def forward(self, x):
        return self.linear_fc2(torch.relu(self.linear_fc1(x)))


class Layer(nn.Module):
    def __init__(self, h: int, dtype=torch.float32):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h, dtype=dtype)
        self.self_attention = Attention(h, dtype)
        self.mlp = MLP(h, dtype)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, h: int = 4, n: int = 2, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(Layer(h, dtype) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GPT(nn.Module):
    def __init__(self, h: int = 4, n: int = 2, dtype=torch.float32):
        super().__init__()
        self.decoder = Decoder(h, n, dtype)
        self.output_layer = nn.Linear(h, 5, bias=False, dtype=dtype)

    def forward(self, x):
        return self.output_layer(self.decoder(x))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _wrapped_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_adapter_wrapper(m)]


def _set_adapter(wrapper: LoRALinear, A: torch.Tensor, B: torch.Tensor) -> None:
    with torch.no_grad():
        wrapper.adapter.linear_in.weight.copy_(A)
        wrapper.adapter.linear_out.weight.copy_(B)


def _single(in_f=5, out_f=7, dim=3, alpha=6.0, dtype=torch.float64, **kwargs):
    """A wrapped nn.Linear named 'linear_qkv' with random non-zero base, A and B."""
    g = torch.Generator().manual_seed(0)
    holder = nn.Module()
    holder.linear_qkv = nn.Linear(in_f, out_f, dtype=dtype)
    _quiet(LoRA(dim=dim, alpha=alpha, **kwargs), holder)
    w = holder.linear_qkv
    A = torch.randn(dim, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, dim, generator=g, dtype=torch.float64)
    _set_adapter(w, A, B)
    return w, A, B


def _formula(w: LoRALinear, x, A, B, scale):
    base = w.to_wrap
    y = x.double() @ base.weight.double().T
    if base.bias is not None:
        y = y + base.bias.double()
    return y + scale * (x.double() @ A.double().T @ B.double().T)


# --------------------------------------------------------------------------- math


def test_adapted_output_equals_formula():
    w, A, B = _single()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(w(x), _formula(w, x, A, B, 6.0 / 3), rtol=1e-12, atol=1e-12)
    assert w.adapter.scale == 2.0 and w.adapter.dim == 3 and w.adapter.alpha == 6.0


@settings(max_examples=30, deadline=None)
@given(
    in_f=st.integers(1, 9),
    out_f=st.integers(1, 9),
    dim=st.integers(1, 6),
    alpha=st.floats(-64, 64, allow_nan=False),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_adapted_output_equals_formula_property(in_f, out_f, dim, alpha, batch, seed):
    w, A, B = _single(in_f, out_f, dim, alpha)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(w(x), _formula(w, x, A, B, alpha / dim), rtol=1e-10, atol=1e-10)


def test_default_init_leaves_output_unchanged_and_draws_in_walk_order():
    model = GPT()
    x = torch.randn(3, 4)
    before = model(x)
    torch.manual_seed(123)
    _quiet(LoRA(dim=2), model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0
    # Adapters are drawn A then B, module by module in walk order, from the global generator.
    torch.manual_seed(123)
    for name in _wrapped_names(model):
        wrapper = model.get_submodule(name)
        out_f, in_f = wrapper.to_wrap.weight.shape
        A = nn.init.xavier_normal_(torch.empty(2, in_f))
        B = torch.zeros(out_f, 2)
        assert torch.equal(wrapper.adapter.linear_in.weight, A), name
        assert torch.equal(wrapper.adapter.linear_out.weight, B), name


_TORCH_INIT = {
    "xavier": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "normal": lambda w: nn.init.normal_(w, 0.0, 0.2),
    "zero": nn.init.zeros_,
}


@pytest.mark.parametrize("a_method", INIT_METHODS)
@pytest.mark.parametrize("b_method", ["zero", "normal", "kaiming"])
def test_init_is_torch_init_over_the_full_shape_drawn_a_then_b(a_method, b_method):
    # The reference writes the init formulas out itself; they must give
    # torch.nn.init's numbers bit for bit, drawn A then B per module in walk order.
    model = GPT()
    torch.manual_seed(5)
    _quiet(LoRA(dim=3, lora_A_init_method=a_method, lora_B_init_method=b_method), model)
    torch.manual_seed(5)
    for name in _wrapped_names(model):
        wrapper = model.get_submodule(name)
        out_f, in_f = wrapper.to_wrap.weight.shape
        A = _TORCH_INIT[a_method](torch.empty(3, in_f))
        B = _TORCH_INIT[b_method](torch.empty(out_f, 3))
        assert torch.equal(wrapper.adapter.linear_in.weight, A), (name, "A")
        assert torch.equal(wrapper.adapter.linear_out.weight, B), (name, "B")


@pytest.mark.parametrize("a_method, b_method", [("xavier", "normal"), ("kaiming", "xavier_uniform"), ("normal", "zero")])
@pytest.mark.parametrize("lora_dtype", [None, torch.bfloat16])
def test_reference_and_megatron_draw_the_same_adapters(a_method, b_method, lora_dtype):
    # SPEC: for a given torch.manual_seed both implementations draw the same
    # full adapters (float32 on the CPU, A then B, modules in pre-order walk order).
    megatron = pytest.importorskip("lora.megatron")

    def build(impl):
        torch.manual_seed(0)
        model = GPT(n=2)
        torch.manual_seed(99)
        kw = dict(dim=2, lora_A_init_method=a_method, lora_B_init_method=b_method, lora_dtype=lora_dtype)
        return _quiet(impl.LoRA(target_modules=[], exclude_modules=["linear_fc2"], **kw), model)

    import lora.reference as reference

    ref, meg = build(reference), build(megatron)
    ref_params, meg_params = dict(ref.named_parameters()), dict(meg.named_parameters())
    assert list(ref_params) == list(meg_params)
    assert any(".adapter." in n for n in ref_params)
    for name, p in ref_params.items():
        assert p.dtype == meg_params[name].dtype, name
        assert torch.equal(p, meg_params[name]), name


def test_same_seed_same_adapters():
    def build(seed):
        torch.manual_seed(0)
        model = GPT()
        torch.manual_seed(seed)
        return _quiet(LoRA(dim=2, lora_B_init_method="normal"), model)

    a, b, c = build(1), build(1), build(2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("method", ["xavier", "xavier_uniform", "kaiming", "normal"])
def test_adapter_init_distribution_uses_full_adapter_shape(method):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.linear_fc1 = nn.Linear(1024, 512)
    _quiet(LoRA(dim=64, lora_A_init_method=method, lora_B_init_method=method), holder)
    A = holder.linear_fc1.adapter.linear_in.weight  # (64, 1024)
    B = holder.linear_fc1.adapter.linear_out.weight  # (512, 64)
    expected_std = {
        "xavier": lambda o, i: math.sqrt(2 / (o + i)),
        "xavier_uniform": lambda o, i: math.sqrt(2 / (o + i)),
        "kaiming": lambda o, i: 1 / math.sqrt(3 * i),
        "normal": lambda o, i: 0.2,
    }[method]
    assert A.std().item() == pytest.approx(expected_std(64, 1024), rel=0.03)
    assert B.std().item() == pytest.approx(expected_std(512, 64), rel=0.03)


def test_parameter_names_follow_bridge():
    model = _quiet(LoRA(dim=2), GPT())
    names = {n for n, _ in model.named_parameters()}
    prefix = "decoder.layers.0.self_attention.linear_qkv"
    assert {f"{prefix}.to_wrap.weight", f"{prefix}.to_wrap.bias",
            f"{prefix}.adapter.linear_in.weight", f"{prefix}.adapter.linear_out.weight"} <= names
    assert not any("bias" in n and "adapter" in n for n in names)
    wrapper = model.get_submodule(prefix)
    assert wrapper.adapter.linear_in.weight.shape == (2, 4)
    assert wrapper.adapter.linear_out.weight.shape == (12, 2)
    # attributes of the base are reachable through the wrapper
    assert wrapper.weight is wrapper.to_wrap.weight and wrapper.in_features == 4
    with pytest.raises(AttributeError, match="'LoRALinear' object \\(wrapping Linear\\) has no attribute 'nope'"):
        wrapper.nope


# ------------------------------------------------------------------------ dropout


def _dropout_mask(shape, p, seed):
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape, dtype=torch.float64), p=p, training=True)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_position_in_training(position):
    p = 0.6
    w, A, B = _single(dropout=p, dropout_position=position)
    x = torch.randn(8, 5, dtype=torch.float64)
    w.train()
    torch.manual_seed(42)
    y = w(x)
    base = _formula(w, x, A, B, 0.0)
    scale = 2.0
    if position == "pre":
        mask = _dropout_mask((8, 5), p, 42)
        expected = base + scale * ((x * mask) @ A.T @ B.T)
    else:
        mask = _dropout_mask((8, 7), p, 42)
        expected = base + scale * mask * (x @ A.T @ B.T)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    # and it is genuinely different from no dropout
    assert not torch.allclose(y, _formula(w, x, A, B, scale))


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_is_identity_in_eval(position):
    w, A, B = _single(dropout=0.9, dropout_position=position)
    w.eval()
    x = torch.randn(8, 5, dtype=torch.float64)
    torch.testing.assert_close(w(x), _formula(w, x, A, B, 2.0), rtol=1e-12, atol=1e-12)


def test_dropout_never_touches_the_base_branch():
    w, A, B = _single(dropout=0.99, dropout_position="pre")
    _set_adapter(w, A, torch.zeros_like(B))
    w.train()
    x = torch.randn(8, 5, dtype=torch.float64)
    torch.testing.assert_close(w(x), _formula(w, x, A, B, 0.0), rtol=0, atol=0)


# ------------------------------------------------------------------------- dtypes


def test_lora_dtype_bf16_on_float32_base():
    holder = nn.Module()
    holder.linear_fc1 = nn.Linear(6, 5)
    _quiet(LoRA(dim=4, alpha=8, lora_dtype=torch.bfloat16, lora_B_init_method="normal"), holder)
    w = holder.linear_fc1
    assert w.adapter.linear_in.weight.dtype == torch.bfloat16
    assert w.adapter.linear_out.weight.dtype == torch.bfloat16
    assert w.to_wrap.weight.dtype == torch.float32
    x = torch.randn(3, 6)
    y = w(x)
    assert y.dtype == torch.float32
    # adapter branch computed in bf16 (input cast), result cast back before the sum
    h = F.linear(F.linear(x.to(torch.bfloat16), w.adapter.linear_in.weight), w.adapter.linear_out.weight) * 2.0
    expected = F.linear(x, w.to_wrap.weight, w.to_wrap.bias) + h.to(torch.float32)
    assert torch.equal(y, expected)


def test_lora_dtype_float64_on_float32_base():
    holder = nn.Module()
    holder.linear_fc1 = nn.Linear(6, 5)
    _quiet(LoRA(dim=2, alpha=2, lora_dtype=torch.float64, lora_B_init_method="normal"), holder)
    w = holder.linear_fc1
    assert w.adapter.linear_in.weight.dtype == torch.float64
    x = torch.randn(3, 6)
    y = w(x)
    assert y.dtype == torch.float32
    delta = x.double() @ w.adapter.linear_in.weight.T @ w.adapter.linear_out.weight.T
    torch.testing.assert_close(y, F.linear(x, w.to_wrap.weight, w.to_wrap.bias) + delta.float(), rtol=0, atol=0)


def test_lora_dtype_none_follows_base_weight():
    model = _quiet(LoRA(dim=2), GPT(dtype=torch.bfloat16))
    w = model.decoder.layers[0].mlp.linear_fc1
    assert w.adapter.linear_in.weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------- matching


def test_default_targets_wrap_the_four_linears_only():
    model = _quiet(LoRA(dim=2), GPT())
    expected = [f"decoder.layers.{i}.{m}" for i in range(2) for m in
                ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]]
    assert _wrapped_names(model) == expected


def test_wildcard_selects_layer_0_not_layer_10():
    model = GPT(n=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRA(target_modules=["*.layers.0.*.linear_qkv", "decoder.layers.1*.mlp.linear_fc2"], dim=2)(model)
    assert _wrapped_names(model) == [
        "decoder.layers.0.self_attention.linear_qkv",
        "decoder.layers.1.mlp.linear_fc2",
        "decoder.layers.10.mlp.linear_fc2",
    ]


def test_exclude_mode_wraps_every_other_linear():
    model = LoRA(target_modules=[], exclude_modules=["linear_proj", "*.layers.1.*"], dim=2)(GPT())
    assert _wrapped_names(model) == [
        "decoder.layers.0.self_attention.linear_qkv",
        "decoder.layers.0.mlp.linear_fc1",
        "decoder.layers.0.mlp.linear_fc2",
        "output_layer",
    ]


def test_exclude_mode_wraps_a_bare_linear_root():
    model = LoRA(target_modules=[], exclude_modules=["nothing"], dim=1)
    with pytest.warns(UserWarning, match="'nothing'"):
        out = model(nn.Linear(3, 2))
    assert isinstance(out, LoRALinear) and out.to_wrap.weight.requires_grad is False


def test_both_target_and_exclude_is_an_error():
    with pytest.raises(ValueError, match=r"pass target_modules=\[\]"):
        LoRA(exclude_modules=["linear_proj"])


def test_unmatched_pattern_warns_naming_it():
    with pytest.warns(UserWarning) as rec:
        LoRA(target_modules=["linear_qkv", "linear_qvk"], dim=2)(GPT())
    messages = [str(r.message) for r in rec]
    assert any("'linear_qvk'" in m for m in messages)
    assert not any("'linear_qkv'" in m for m in messages)


def test_matched_module_without_adapter_is_a_type_error():
    with pytest.raises(TypeError) as err:
        LoRA(target_modules=["input_layernorm"], dim=2)(GPT())
    msg = str(err.value)
    assert "decoder.layers.0.input_layernorm" in msg and "LayerNorm" in msg


def test_transform_standalone():
    lora = LoRA(dim=2)
    lin = nn.Linear(3, 3)
    assert lora.transform(lin, "linear_fc1", "decoder.layers.0.mlp").to_wrap is lin
    assert lora.transform(lin, "other", "decoder") is lin


# ------------------------------------------------------------- freezing, repeats


def test_freezes_base_and_trains_adapters():
    model = GPT()
    model.eval()
    out = _quiet(LoRA(dim=2, lora_B_init_method="normal"), model)
    assert out is model and model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapter." in name), name
    model(torch.randn(3, 4)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".adapter." in name), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name


def test_training_false_is_inference_everything_frozen_and_eval():
    model = _quiet(LoRA(dim=2), GPT(), training=False)
    assert not any(m.training for m in model.modules())
    names = {n for n, _ in model.named_parameters()}
    assert any(".adapter." in n for n in names)
    assert not any(p.requires_grad for p in model.parameters())
    # Idempotent: again with training=False changes nothing...
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = _quiet(LoRA(dim=2), model, training=False)
    assert again is model and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ...and training=True afterwards makes exactly the adapters trainable.
    _quiet(LoRA(dim=2), model, training=True)
    assert model.training
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapter." in name), name


def test_training_false_on_a_bare_linear_root():
    out = _quiet(LoRA(target_modules=[], exclude_modules=["x"], dim=1), nn.Linear(3, 2), training=False)
    assert isinstance(out, LoRALinear) and not out.training
    assert not any(p.requires_grad for p in out.parameters())


def test_freeze_model_freezes_adapters_too():
    model = _quiet(LoRA(dim=2), GPT())
    model.eval()
    LoRA(dim=2).freeze_model(model, training=True)
    assert model.training and not any(p.requires_grad for p in model.parameters())


def test_apply_twice_changes_nothing():
    torch.manual_seed(0)
    model = _quiet(LoRA(dim=2, lora_B_init_method="normal"), GPT())
    with torch.no_grad():  # as if trained a bit
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    wrappers = {n: id(m) for n, m in model.named_modules() if is_adapter_wrapper(m)}
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        again = LoRA(dim=2, lora_B_init_method="normal")(model)
    assert again is model
    # the first call warned about nothing either (GPT has all four targets)
    assert [str(r.message) for r in rec] == []
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: id(m) for n, m in model.named_modules() if is_adapter_wrapper(m)} == wrappers
    assert not any(is_adapter_wrapper(m.to_wrap) for m in model.modules() if is_adapter_wrapper(m))


def test_list_of_chunks():
    chunks = [GPT(n=1), GPT(n=1)]
    out = _quiet(LoRA(dim=2), chunks)
    assert isinstance(out, list) and len(out) == 2 and out[0] is chunks[0]
    assert all(len(_wrapped_names(c)) == 4 for c in out)


# ----------------------------------------------------------------- tuple outputs


class TupleLinear(nn.Linear):
    """A linear that returns (output, bias) like megatron's skip_bias_add layers."""

    def forward(self, x):
        return F.linear(x, self.weight), self.bias


def test_tuple_output_is_kept():
    holder = nn.Module()
    holder.linear_proj = TupleLinear(4, 3, dtype=torch.float64)
    _quiet(LoRA(dim=2, alpha=4), holder)
    w = holder.linear_proj
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    _set_adapter(w, A, B)
    x = torch.randn(5, 4, dtype=torch.float64)
    out, bias = w(x)
    assert bias is w.to_wrap.bias
    torch.testing.assert_close(out, x @ w.to_wrap.weight.T + 2.0 * x @ A.T @ B.T, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- MoE


class _Cfg:
    moe_router_topk = 2


def _moe_model(with_config=True):
    model = nn.Module()
    if with_config:
        model.config = _Cfg()
    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.experts = nn.Module()
    layer.mlp.experts.local_experts = nn.ModuleList(MLP(4) for _ in range(2))
    layer.mlp.shared_experts = MLP(4)
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([layer])
    model.dense = MLP(4)
    return model


def _ranks(model):
    return {n: model.get_submodule(n).adapter.dim for n in _wrapped_names(model)}


def test_normalize_moe_lora_uses_dim_over_topk_for_experts_only():
    model = _quiet(LoRA(dim=8, alpha=16, normalize_moe_lora=True), _moe_model())
    ranks = _ranks(model)
    assert ranks["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"] == 4
    assert ranks["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2"] == 4
    assert ranks["decoder.layers.0.mlp.shared_experts.linear_fc1"] == 8
    assert ranks["dense.linear_fc2"] == 8
    w = model.get_submodule("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1")
    assert w.adapter.alpha == 16 and w.adapter.scale == 4.0
    assert set(_ranks(_quiet(LoRA(dim=8), _moe_model())).values()) == {8}


def test_normalize_moe_lora_errors():
    with pytest.raises(ValueError, match="dim=7 is not divisible by topk=2"):
        _quiet(LoRA(dim=7, normalize_moe_lora=True), _moe_model())
    with pytest.raises(ValueError, match="no moe_router_topk"):
        _quiet(LoRA(dim=8, normalize_moe_lora=True), _moe_model(with_config=False))
    # no experts: no topk needed
    _quiet(LoRA(dim=7, normalize_moe_lora=True), GPT())


# --------------------------------------------------------------------------- VLM


class VLM(nn.Module):
    def __init__(self, with_projection=True):
        super().__init__()
        self.vision_model = MLP(4)
        self.vision_projection = MLP(4) if with_projection else None
        self.language_model = GPT(n=1)
        self.extra = nn.Linear(2, 2)  # outside the three subtrees: never touched


def _requires_grad(module):
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_vlm_flags(flags):
    fv, fp, fl = flags
    model = VLM()
    model.eval()
    out = _quiet(VLMLoRA(dim=2, freeze_vision_model=fv, freeze_vision_projection=fp, freeze_language_model=fl), model)
    assert out is model and model.training
    for part, frozen in [("vision_model", fv), ("vision_projection", fp), ("language_model", fl)]:
        params = _requires_grad(getattr(model, part))
        assert any(".adapter." in n for n in params), part
        for name, rg in params.items():
            assert rg == ((".adapter." in name) or not frozen), (part, name)
    assert all(_requires_grad(model.extra).values())


def test_vlm_none_subtree_and_unwrapping():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    class Llava(nn.Module):
        def __init__(self):
            super().__init__()
            self.llava_model = VLM(with_projection=False)

    chunk = Wrapper(Wrapper(Llava()))
    out = _quiet(VLMLoRA(dim=2, freeze_language_model=False), [chunk])
    assert out == [chunk]
    vlm = chunk.module.module.llava_model
    assert vlm.vision_projection is None
    assert all(rg == (".adapter." in n) for n, rg in _requires_grad(vlm.vision_model).items())
    assert all(_requires_grad(vlm.language_model).values())


def test_vlm_training_leaves_adapters_trainable_and_is_idempotent():
    lora = VLMLoRA(dim=2)
    model = _quiet(lora, VLM())
    before = _requires_grad(model)
    _quiet(lora, model)
    assert _requires_grad(model) == before
    assert all(rg for n, rg in before.items() if ".adapter." in n)


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_vlm_training_false_freezes_flagged_subtrees_adapters_included(flags):
    fv, fp, fl = flags
    model = VLM()
    lora = VLMLoRA(dim=2, freeze_vision_model=fv, freeze_vision_projection=fp, freeze_language_model=fl)
    out = _quiet(lora, model, training=False)
    assert out is model and not any(m.training for m in model.modules())
    for part, frozen in [("vision_model", fv), ("vision_projection", fp), ("language_model", fl)]:
        params = _requires_grad(getattr(model, part))
        assert any(".adapter." in n for n in params), part
        for name, rg in params.items():
            # flagged: everything frozen, adapters included; unflagged: base keeps
            # its flag (trainable here) and new adapters stay as created (trainable)
            assert rg == (not frozen), (part, name)
    assert all(_requires_grad(model.extra).values())
    before = _requires_grad(model)
    _quiet(lora, model, training=False)
    assert _requires_grad(model) == before


def test_vlm_without_vlm_attributes_is_an_error():
    with pytest.raises(ValueError, match="vision_model"):
        _quiet(VLMLoRA(dim=2), GPT())


def test_vlm_fields():
    v = VLMLoRA()
    assert (v.freeze_vision_model, v.freeze_vision_projection, v.freeze_language_model) == (True, True, True)
    assert v.dim == 32 and isinstance(v, LoRA)
    with pytest.raises(ValueError, match="freeze_language_model"):
        VLMLoRA(freeze_language_model="no")


# ------------------------------------------------------------------------- merge


def test_merge_model_equals_adapted_forward_in_eval():
    torch.manual_seed(0)
    model = _quiet(LoRA(dim=2, alpha=3, dropout=0.5, lora_B_init_method="normal"), GPT(dtype=torch.float64))
    model.eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    adapted = model(x)
    merged = merge_lora(model)
    assert merged is model and _wrapped_names(merged) == []
    assert isinstance(merged.decoder.layers[0].self_attention.linear_qkv, nn.Linear)
    assert not any("adapter" in n or "to_wrap" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), adapted, rtol=1e-12, atol=1e-12)


def test_merge_weight_values_and_bf16_base():
    holder = nn.Module()
    holder.linear_qkv = nn.Linear(6, 5, dtype=torch.bfloat16)
    _quiet(LoRA(dim=2, alpha=5, lora_dtype=torch.float32, lora_B_init_method="normal"), holder)
    w = holder.linear_qkv
    W = w.to_wrap.weight.detach().clone()
    A, B = w.adapter.linear_in.weight.detach().clone(), w.adapter.linear_out.weight.detach().clone()
    LoRAMerge()(holder)
    merged = holder.linear_qkv.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (W.float() + 2.5 * B @ A).to(torch.bfloat16))


def test_merge_method_and_tp_error():
    merge = LoRAMerge()
    base, B, A = torch.ones(3, 2), torch.ones(3, 1), torch.ones(1, 2)
    torch.testing.assert_close(merge.merge(base, B, A, 4, 2), torch.full((3, 2), 3.0))
    with pytest.raises(ValueError, match="single-device"):
        merge.merge(base, B, A, 4, 2, tp_size=2)


def test_merge_list_and_non_wrapped_untouched():
    chunks = [_quiet(LoRA(dim=2), GPT(n=1)), nn.Linear(2, 2)]
    out = merge_lora(chunks)
    assert out[1] is chunks[1] and _wrapped_names(out[0]) == []


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(exclude_modules=["linear_proj"]), "target_modules=[]"),
        (dict(dim=0), "dim=0"),
        (dict(dim=True), "dim=True"),
        (dict(alpha=float("inf")), "alpha=inf"),
        (dict(dropout=1.0), "[0, 1)"),
        (dict(dropout_position="middle"), "'pre' or 'post'"),
        (dict(lora_dtype=torch.int8), "floating"),
        (dict(target_modules="linear_qkv"), "list"),
        (dict(target_modules=["ok", ""]), "non-empty string"),
        (dict(share_expert_adapters=None), "share_expert_adapters=None"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError) as err:
        LoRA(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("field_name", ["lora_A_init_method", "lora_B_init_method"])
def test_unknown_init_method_lists_the_valid_names(field_name):
    with pytest.raises(ValueError) as err:
        LoRA(**{field_name: "he"})
    assert "'he'" in str(err.value) and field_name in str(err.value)
    assert all(name in str(err.value) for name in INIT_METHODS)


def test_config_defaults_and_dtype_names():
    lora = LoRA()
    assert lora.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert LoRA().target_modules is not lora.target_modules
    assert (lora.dim, lora.alpha, lora.dropout, lora.dropout_position) == (32, 32, 0.0, "pre")
    assert (lora.lora_A_init_method, lora.lora_B_init_method, lora.lora_dtype) == ("xavier", "zero", None)
    assert LoRA(lora_dtype="bfloat16").lora_dtype is torch.bfloat16
    assert LoRA(target_modules=[], exclude_modules=("a",)).exclude_modules == ["a"]


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("*.layers.0.*.linear_qkv", "decoder.layers.0.self_attention.linear_qkv", True),
        ("*.layers.0.*.linear_qkv", "decoder.layers.10.self_attention.linear_qkv", False),
        ("*.layers.1*.linear_qkv", "decoder.layers.10.self_attention.linear_qkv", True),
        ("linear_qkv", "decoder.layers.0.self_attention.linear_qkv", True),  # leaf name
        ("self_attention", "decoder.layers.0.self_attention.linear_qkv", False),
        ("decoder.layers.0.*", "decoder.layers.0.self_attention.linear_qkv", True),
        ("decoder.layers.0.self_attention.linear.qkv", "decoder.layers.0.self_attention.linear_qkv", False),
        ("layers[0]", "layers[0]", True),
        ("layer?", "layers", False),
        ("a*b*c", "a.x.b.c", True),
        ("a*b*c", "a.x.c.b", False),
        ("**", "x.y", True),
    ],
)
def test_matching_table(pattern, name, expected):
    from lora.reference.matching import _pattern_selects

    assert _pattern_selects(pattern, name) is expected


def test_adapter_module_repr_and_scale():
    a = LoRAAdapter(3, 4, 2, alpha=1.0, dropout=0.1, dropout_position="post")
    assert a.scale == 0.5 and "dropout_position='post'" in repr(a)
    assert a.linear_in.bias is None and a.linear_out.bias is None
