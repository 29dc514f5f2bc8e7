"""Tests of lora.megatron's parallelism-independent helpers (config, matching, init, walk, freeze, wrapper, merge math)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lora._spec import DEFAULT_TARGET_MODULES, INIT_METHODS
from lora.megatron.config import LoRAFields, find_moe_router_topk, moe_adapter_rank
from lora.megatron.init import init_adapter_weights, init_full_weight
from lora.megatron.matching import ModuleMatcher, is_expert_linear_name, is_linear_type, pattern_matches
from lora.megatron.merge import merge_weight
from lora.megatron.walk import walk_and_replace
from lora.megatron.wrapper import add_to_base_output, apply_dropout

# ------------------------------------------------------------------------- init

OUT, IN = 384, 512  # 196k samples: sample std is within ~0.5% of the true std


def _gen(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_xavier_is_xavier_normal_over_full_shape():
    w = init_full_weight((OUT, IN), "xavier", generator=_gen())
    std = math.sqrt(2.0 / (OUT + IN))
    assert w.shape == (OUT, IN) and w.dtype == torch.float32
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
    # normal, not uniform: values beyond the uniform bound sqrt(3)*std exist
    assert w.abs().max().item() > math.sqrt(3) * std * 1.5


def test_xavier_uniform_bounds_and_std():
    w = init_full_weight((OUT, IN), "xavier_uniform", generator=_gen())
    bound = math.sqrt(6.0 / (OUT + IN))
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert abs(w.mean().item()) < 4 * bound / math.sqrt(3 * w.numel())


def test_kaiming_is_uniform_with_a_sqrt5_fan_in_from_full_shape():
    w = init_full_weight((OUT, IN), "kaiming", generator=_gen())
    # gain(leaky_relu, a=sqrt 5) = sqrt(2 / 6); bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    bound = 1.0 / math.sqrt(IN)
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_fans_come_from_the_full_shape_not_a_shard():
    # A shard of the full matrix keeps the full matrix's spread; an init done
    # on the shard shape (in/4) would have twice the kaiming bound.
    full = init_full_weight((64, 4096), "kaiming", generator=_gen())
    shard = full[:, :1024]
    assert shard.abs().max().item() <= 1.0 / math.sqrt(4096) * (1 + 1e-6)
    on_shard = init_full_weight((64, 1024), "kaiming", generator=_gen())
    assert on_shard.abs().max().item() > 1.5 / math.sqrt(4096)


def test_normal_has_std_point_two():
    w = init_full_weight((OUT, IN), "normal", generator=_gen())
    assert w.std().item() == pytest.approx(0.2, rel=0.02)
    assert abs(w.mean().item()) < 4 * 0.2 / math.sqrt(w.numel())


def test_zero_is_all_zeros_and_draws_nothing():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    w = init_full_weight((5, 3), "zero", dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.count_nonzero(w) == 0 and w.shape == (5, 3)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("method", [m for m in INIT_METHODS if m != "zero"])
def test_same_seed_same_values_at_every_dtype(method):
    a = init_full_weight((7, 9), method, generator=_gen(3))
    b = init_full_weight((7, 9), method, generator=_gen(3), dtype=torch.bfloat16)
    c = init_full_weight((7, 9), method, generator=_gen(4))
    assert torch.equal(b, a.to(torch.bfloat16))
    assert not torch.equal(a, c)
    # the default generator is torch's global CPU one
    torch.manual_seed(11)
    d = init_full_weight((7, 9), method)
    assert torch.equal(d, init_full_weight((7, 9), method, generator=_gen(11)))


def test_init_adapter_weights_draws_a_then_b():
    a, b = init_adapter_weights(6, 5, 3, "xavier", "normal", generator=_gen(9))
    g = _gen(9)
    assert torch.equal(a, init_full_weight((3, 5), "xavier", generator=g))
    assert torch.equal(b, init_full_weight((6, 3), "normal", generator=g))


def test_unknown_init_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        init_full_weight((2, 2), "he")
    msg = str(err.value)
    assert "'he'" in msg
    for name in INIT_METHODS:
        assert name in msg


# --------------------------------------------------------------------- matching

FULL = "decoder.layers.0.self_attention.linear_qkv"


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("*.layers.0.*.linear_qkv", FULL, True),
        ("*.layers.0.*.linear_qkv", "decoder.layers.10.self_attention.linear_qkv", False),
        ("*.layers.1*.linear_qkv", "decoder.layers.10.self_attention.linear_qkv", True),
        ("*linear_qkv", FULL, True),
        ("*", FULL, True),
        ("linear_qkv", FULL, False),  # whole-string match, not search
        ("decoder.layers.0.*", FULL, True),
        ("decoder*proj", "decoder.layers.3.self_attention.linear_proj", True),
        # '.' is literal
        ("decoder.layers.0.self_attention.linear.qkv", "decoder.layers.0.self_attention.linear_qkv", False),
        ("a.b", "axb", False),
        # '[' and '?' are literal, unlike fnmatch
        ("layers[0]", "layers[0]", True),
        ("layers[0]", "layers0", False),
        ("layer?", "layers", False),
        ("layer?", "layer?", True),
        ("*(x)+", "a.(x)+", True),
        ("", "", True),
    ],
)
def test_pattern_matches_table(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


class _FakeTELinear(nn.Module):
    pass


_FakeTELinear.__name__ = "TELayerNormColumnParallelLinear"


def _class(name: str, module: str, base: type = nn.Module) -> type:
    cls = type(name, (base,), {})
    cls.__module__ = module
    return cls


def test_is_linear_type():
    assert is_linear_type(nn.Linear(2, 3))
    assert is_linear_type(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3))
    assert not is_linear_type(nn.LayerNorm(3))
    assert not is_linear_type(nn.Bilinear(2, 2, 2))
    assert is_linear_type(_FakeTELinear())
    # subclasses of a TE class count (MRO walk)
    assert is_linear_type(_class("MyQKV", __name__, _FakeTELinear)())
    for name in ["TELinear", "TEColumnParallelLinear", "TERowParallelLinear",
                 "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear"]:
        assert is_linear_type(_class(name, "megatron.core.extensions.transformer_engine")())
    for name in ["Linear", "LayerNormLinear", "GroupedLinear"]:
        assert is_linear_type(_class(name, "transformer_engine.pytorch.module.x")())
        assert not is_linear_type(_class(name, "somewhere.else")())


def test_is_expert_linear_name():
    assert is_expert_linear_name("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1")
    assert is_expert_linear_name("decoder.layers.0.mlp.experts.linear_fc2")
    assert not is_expert_linear_name("decoder.layers.0.mlp.shared_experts.linear_fc1")
    assert not is_expert_linear_name("decoder.layers.0.mlp.linear_fc1")


def test_matcher_target_mode_leaf_or_full_name():
    m = ModuleMatcher(["linear_qkv", "*.layers.1.*.linear_proj"])
    lin = nn.Linear(2, 2)
    assert m.matches(lin, FULL)
    assert m.matches(lin, "linear_qkv")
    assert m.matches(lin, "decoder.layers.1.self_attention.linear_proj")
    assert not m.matches(lin, "decoder.layers.11.self_attention.linear_proj")
    assert not m.matches(lin, "decoder.layers.0.self_attention.linear_qkv_extra")
    # target mode matches by name whatever the type
    assert m.matches(nn.LayerNorm(2), "x.linear_qkv")
    assert m.matching_pattern(lin, FULL) == "linear_qkv"


def test_matcher_exclude_mode_only_linears_not_excluded():
    m = ModuleMatcher([], ["linear_proj", "*.layers.1.*"])
    lin = nn.Linear(2, 2)
    assert m.matches(lin, FULL)
    assert not m.matches(lin, "decoder.layers.0.self_attention.linear_proj")
    assert not m.matches(lin, "decoder.layers.1.mlp.linear_fc1")
    assert m.matches(lin, "decoder.layers.10.mlp.linear_fc1")
    assert not m.matches(nn.LayerNorm(2), "decoder.layers.0.norm")
    assert m.unmatched_patterns() == []


def test_matcher_both_modes_is_an_error():
    with pytest.raises(ValueError, match=r"target_modules=\[\]"):
        ModuleMatcher(["linear_qkv"], ["linear_proj"])


def test_matcher_warns_for_each_unused_pattern():
    m = ModuleMatcher(["linear_qkv", "nope", "*.missing"])
    m.matches(nn.Linear(1, 1), FULL)
    with pytest.warns(UserWarning) as rec:
        m.warn_unmatched()
    messages = [str(r.message) for r in rec]
    assert len(messages) == 2
    assert "'nope'" in messages[0] and "'*.missing'" in messages[1]
    m.reset()
    assert m.unmatched_patterns() == ["linear_qkv", "nope", "*.missing"]


def test_matcher_exclude_pattern_naming_a_container_is_reported():
    m = ModuleMatcher([], ["vision_model"])
    m.matches(nn.Sequential(), "vision_model")
    m.matches(nn.Linear(1, 1), "vision_model.linear_fc1")
    assert m.unmatched_patterns() == ["vision_model"]


def test_matcher_with_nothing_to_match_warns():
    m = ModuleMatcher([], [])
    assert not m.matches(nn.Linear(1, 1), "a")
    with pytest.warns(UserWarning, match="both empty"):
        m.warn_unmatched()


def test_matcher_no_warning_when_all_used():
    m = ModuleMatcher(["a"])
    m.matches(nn.Linear(1, 1), "x.a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.warn_unmatched()


# ----------------------------------------------------------------------- config


def test_fields_defaults():
    f = LoRAFields()
    assert f.target_modules == list(DEFAULT_TARGET_MODULES) and isinstance(f.target_modules, list)
    assert LoRAFields().target_modules is not f.target_modules
    assert (f.exclude_modules, f.dim, f.alpha, f.dropout, f.dropout_position) == ([], 32, 32, 0.0, "pre")
    assert (f.lora_A_init_method, f.lora_B_init_method, f.lora_dtype) == ("xavier", "zero", None)
    assert (f.a2a_experimental, f.normalize_moe_lora, f.share_expert_adapters) == (False, False, True)
    assert f.scale == 1.0
    assert LoRAFields(dim=8, alpha=4).scale == 0.5


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(exclude_modules=["linear_proj"]), "target_modules=[]"),
        (dict(dim=0), "dim=0"),
        (dict(dim=2.0), "dim=2.0"),
        (dict(dim=True), "dim=True"),
        (dict(alpha="1"), "alpha='1'"),
        (dict(alpha=float("nan")), "alpha=nan"),
        (dict(dropout=1.0), "[0, 1)"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(dropout_position="middle"), "'pre' or 'post'"),
        (dict(lora_A_init_method="he"), "lora_A_init_method 'he'"),
        (dict(lora_B_init_method="ones"), "xavier_uniform"),
        (dict(lora_dtype=torch.int8), "floating"),
        (dict(lora_dtype="int8"), "lora_dtype='int8'"),
        (dict(target_modules="linear_qkv"), "list"),
        (dict(target_modules=["ok", ""]), "non-empty string"),
        (dict(normalize_moe_lora=1), "normalize_moe_lora=1"),
    ],
)
def test_fields_validation_names_field_value_and_rule(kwargs, needle):
    with pytest.raises(ValueError) as err:
        LoRAFields(**kwargs)
    assert needle in str(err.value)


def test_fields_exclude_mode_and_dtype_names():
    f = LoRAFields(target_modules=[], exclude_modules=("linear_proj",), lora_dtype="bfloat16")
    assert f.exclude_modules == ["linear_proj"] and f.lora_dtype is torch.bfloat16
    assert LoRAFields(lora_dtype="torch.float64").lora_dtype is torch.float64


# ---------------------------------------------------------------------- helpers


def test_add_to_base_output_tensor_and_tuple():
    out = torch.ones(2, 3, dtype=torch.bfloat16)
    delta = torch.full((2, 3), 0.5, dtype=torch.float64)
    y = add_to_base_output(out, delta)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.full((2, 3), 1.5, dtype=torch.bfloat16))
    bias = torch.arange(3.0)
    y2 = add_to_base_output((out.float(), bias), delta)
    assert isinstance(y2, tuple) and len(y2) == 2 and y2[1] is bias
    assert y2[0].dtype == torch.float32 and torch.equal(y2[0], torch.full((2, 3), 1.5))
    y3 = add_to_base_output((out.float(), None), delta)
    assert y3[1] is None
    with pytest.raises(TypeError):
        add_to_base_output([out], delta)


def test_apply_dropout():
    x = torch.ones(1000)
    assert apply_dropout(x, 0.5, training=False) is x
    assert apply_dropout(x, 0.0, training=True) is x
    y = apply_dropout(x, 0.75, training=True)
    assert set(y.unique().tolist()) <= {0.0, 4.0}
    assert 0.15 < (y != 0).float().mean().item() < 0.35


def test_merge_weight_values_and_dtype():
    g = _gen(5)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    B = torch.randn(6, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, 4, generator=g, dtype=torch.float64)
    merged = merge_weight(base, B, A, alpha=6, dim=3)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, base + 2.0 * B @ A, rtol=0, atol=1e-12)

    base16 = base.to(torch.bfloat16)
    merged16 = merge_weight(base16, B.to(torch.bfloat16), A.to(torch.bfloat16), alpha=6, dim=3)
    expected = (base16.float() + 2.0 * (B.to(torch.bfloat16).float() @ A.to(torch.bfloat16).float())).to(torch.bfloat16)
    assert merged16.dtype == torch.bfloat16
    assert torch.equal(merged16, expected)  # float32 compute, one rounding
    # B and A in another dtype than the base: still computed in float32
    merged_mixed = merge_weight(base.float(), B.to(torch.bfloat16), A.float(), alpha=6, dim=3)
    assert merged_mixed.dtype == torch.float32
    torch.testing.assert_close(merged_mixed, base.float() + 2.0 * B.to(torch.bfloat16).float() @ A.float())


@pytest.mark.parametrize(
    "shapes, needle",
    [
        (((6, 4), (6, 3), (2, 4)), "rank"),
        (((6, 4), (5, 3), (3, 4)), "base weight"),
        (((6, 4), (6, 3), (3, 5)), "base weight"),
        (((6, 4, 1), (6, 3), (3, 4)), "2-D"),
    ],
)
def test_merge_weight_shape_errors(shapes, needle):
    with pytest.raises(ValueError, match=needle):
        merge_weight(*(torch.zeros(s) for s in shapes), alpha=1, dim=3)
    with pytest.raises(ValueError, match="dim=0"):
        merge_weight(torch.zeros(6, 4), torch.zeros(6, 3), torch.zeros(3, 4), alpha=1, dim=0)


def test_moe_rank_and_topk_lookup():
    class Cfg:
        moe_router_topk = 4

    holder = nn.Module()
    holder.config = Cfg()
    outer = nn.Module()
    outer.module = holder
    assert find_moe_router_topk(nn.Linear(1, 1), outer) == 4
    assert find_moe_router_topk(nn.Linear(1, 1)) is None
    assert moe_adapter_rank(16, 4, "x") == 4
    with pytest.raises(ValueError, match="dim=6 is not divisible by topk=4 for a.mlp.experts.b"):
        moe_adapter_rank(6, 4, "a.mlp.experts.b")
    with pytest.raises(ValueError, match="no moe_router_topk"):
        moe_adapter_rank(6, None, "a.mlp.experts.b")


def test_walk_visits_shared_module_once_and_replaces_everywhere():
    shared = nn.Linear(2, 2)
    root = nn.Module()
    root.a = shared
    root.b = nn.Sequential(shared, nn.ReLU())
    seen = []

    def visit(module, name, prefix):
        seen.append((prefix, name))
        if isinstance(module, nn.Linear):
            return nn.Identity(), False
        return module, True

    out = walk_and_replace(root, visit)
    assert out is root
    assert seen == [("", ""), ("", "a"), ("", "b"), ("b", "1")]
    assert [n for n, _ in root.named_modules()] == ["", "a", "b", "b.1"]
    assert isinstance(root.a, nn.Identity) and root.b[0] is root.a


def test_freeze_parameters_freezes_everything_given():
    from lora.megatron.freeze import freeze_parameters

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    freeze_parameters([a])
    assert not any(p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in b.parameters())


def test_freeze_vlm_freezes_flagged_subtrees_adapters_included():
    from lora.megatron.freeze import freeze_vlm

    vlm = nn.Module()
    vlm.vision_model = nn.Linear(2, 2)
    vlm.vision_projection = None
    vlm.language_model = nn.Linear(2, 2)
    vlm.eval()
    freeze_vlm(vlm, freeze_language_model=False, training=True)
    assert vlm.training
    assert not any(p.requires_grad for p in vlm.vision_model.parameters())
    assert all(p.requires_grad for p in vlm.language_model.parameters())
    with pytest.raises(ValueError, match="vision_model"):
        freeze_vlm(nn.Linear(1, 1))
