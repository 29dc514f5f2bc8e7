"""Tests of lora.megatron on real megatron-core GPT models at TP=1 (1-rank pool) and TP=2 (2-rank pool).

Checked by values against harness/SPEC.md: adapter parameter names and per-rank
shapes (the TP table) for linear_qkv, linear_proj, linear_fc1 (gated or not),
linear_fc2 and output_layer; the initial adapter is the same full matrix at
every layout (gated fc1: B's local rows are [gate slice; up slice]); errors and
warnings for bad configs; idempotence; freezing; lora_dtype; eval-mode
dropout; LoRAMerge on column and row shards and merge_lora on a whole model;
a row-parallel base that scatters its own input; and VLMLoRA's freeze flags
on a plain torch model (no pool).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core")

from tests.helpers import megatron_tasks as tasks  # noqa: E402

POOL_KW = dict(
    initializer="harness.cpu:rank_initializer",
    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
)
SEED = 17
R = 4  # adapter rank, divisible by 2

# GPTShape() defaults: hidden 32, 4 heads of 8, 2 query groups, ffn 64, vocab 64.
H, FFN, VOCAB = 32, 64, 64
QKV = (4 + 2 * 2) * 8
LAYER0 = "decoder.layers.0"
MODULES = {
    # name: (kind, in, out-with-gated-fc1, out-without)
    f"{LAYER0}.self_attention.linear_qkv": ("column", H, QKV, QKV),
    f"{LAYER0}.self_attention.linear_proj": ("row", H, H, H),
    f"{LAYER0}.mlp.linear_fc1": ("column", H, 2 * FFN, FFN),
    f"{LAYER0}.mlp.linear_fc2": ("row", FFN, H, H),
    "output_layer": ("column", H, VOCAB, VOCAB),
}
# Exclude mode: every linear of layer 0 plus output_layer (layer 1 is excluded).
EXCLUDE_KW = dict(target_modules=[], exclude_modules=["*.layers.1.*"], dim=R, alpha=8)


def pool(world_size: int):
    from harness.pool import get_pool

    return get_pool(world_size, "gloo", **POOL_KW)


def run(tp: int, fn, *args):
    return pool(tp).run(fn, *args)


def expected_local_shapes(kind: str, fin: int, fout: int, t: int, r: int = R) -> dict[str, tuple[int, int]]:
    """SPEC's TP table, per rank."""
    if kind == "column":
        return {"to_wrap": (fout // t, fin), "linear_in": (r // t, fin), "linear_out": (fout // t, r)}
    return {"to_wrap": (fout, fin // t), "linear_in": (r, fin // t), "linear_out": (fout // t, r)}


def split_gated_rows(full: torch.Tensor, rank: int, t: int) -> torch.Tensor:
    """What TP rank `rank` of `t` holds of a gated fc1's rows: its gate slice, then its up slice."""
    half = full.shape[0] // 2
    n = half // t
    return torch.cat([full[rank * n : (rank + 1) * n], full[half + rank * n : half + (rank + 1) * n]])


def adapter_names(params):
    return sorted(n for n in params if ".adapter." in n)


# ------------------------------------------------------------ names, shapes


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("gated", [True, False])
def test_names_and_local_shapes_follow_the_tp_table(tp, gated):
    results = run(tp, tasks.lora_parameters, SEED, EXCLUDE_KW, {"gated_linear_unit": gated})
    expected_names = sorted(
        f"{m}.adapter.{which}.weight" for m in MODULES for which in ("linear_in", "linear_out")
    )
    for res in results:
        assert res["tp"] == tp
        assert res["warnings"] == []
        assert res["wrapped"] == sorted(MODULES)
        params = res["params"]
        assert adapter_names(params) == expected_names
        for module, (kind, fin, out_gated, out_plain) in MODULES.items():
            fout = out_gated if gated else out_plain
            shapes = expected_local_shapes(kind, fin, fout, tp)
            assert f"{module}.weight" not in params  # the base moved under to_wrap
            got = {
                "to_wrap": tuple(params[f"{module}.to_wrap.weight"]["value"].shape),
                "linear_in": tuple(params[f"{module}.adapter.linear_in.weight"]["value"].shape),
                "linear_out": tuple(params[f"{module}.adapter.linear_out.weight"]["value"].shape),
            }
            assert got == shapes, f"{module} at TP={tp} rank {res['tp_rank']}"
        # Layer 1 is excluded: its linears are plain base layers.
        assert "decoder.layers.1.self_attention.linear_qkv.weight" in params


def test_default_targets_adapt_every_layer_but_not_the_output_layer():
    (res,) = run(1, tasks.lora_parameters, SEED, dict(dim=R), {})
    assert res["wrapped"] == sorted(
        f"decoder.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    )
    assert res["warnings"] == []


@pytest.mark.parametrize("tp", [1, 2])
def test_base_frozen_adapters_trainable(tp):
    for res in run(tp, tasks.lora_parameters, SEED, EXCLUDE_KW, {}):
        assert res["training"] is True
        trainable = sorted(n for n, p in res["params"].items() if p["requires_grad"])
        assert trainable == adapter_names(res["params"])
        assert len(trainable) == 2 * len(MODULES)
        assert all(p["dtype"] == torch.float32 for p in res["params"].values())


@pytest.mark.parametrize("tp", [1, 2])
def test_training_false_is_inference_everything_frozen_and_eval(tp):
    kw = dict(EXCLUDE_KW, lora_B_init_method="normal")
    (train_res, *_) = run(tp, tasks.lora_parameters, SEED, kw, {})
    for res in run(tp, tasks.lora_parameters, SEED, kw, {}, False):
        assert res["training"] is False and res["any_module_training"] is False
        assert adapter_names(res["params"]) == adapter_names(train_res["params"])
        assert not any(p["requires_grad"] for p in res["params"].values())
        if res["tp_rank"] == 0:  # same adapters as with training=True
            for name in adapter_names(res["params"]):
                assert torch.equal(res["params"][name]["value"], train_res["params"][name]["value"]), name


# ------------------------------------------------- same adapter at every TP


@pytest.mark.parametrize("gated", [True, False])
def test_initial_adapter_is_the_same_full_matrix_at_tp1_and_tp2(gated):
    kw = dict(EXCLUDE_KW, lora_B_init_method="normal")
    shape_kw = {"gated_linear_unit": gated}
    (ref,) = run(1, tasks.lora_parameters, SEED, kw, shape_kw)
    ranks = run(2, tasks.lora_parameters, SEED, kw, shape_kw)
    for module, (kind, *_rest) in MODULES.items():
        full_a = ref["params"][f"{module}.adapter.linear_in.weight"]["value"]
        full_b = ref["params"][f"{module}.adapter.linear_out.weight"]["value"]
        assert full_b.abs().sum() > 0
        a = [r["params"][f"{module}.adapter.linear_in.weight"]["value"] for r in ranks]
        b = [r["params"][f"{module}.adapter.linear_out.weight"]["value"] for r in ranks]
        # A: split along r for a column base, along in for a row base.
        assert torch.equal(torch.cat(a, dim=0 if kind == "column" else 1), full_a), module
        # B: rows split exactly like the base weight's rows.
        for rank, local in enumerate(b):
            if gated and module.endswith("linear_fc1"):
                expected = split_gated_rows(full_b, rank, 2)
            else:
                expected = torch.chunk(full_b, 2, dim=0)[rank]
            assert torch.equal(local, expected), f"{module} B on TP rank {rank}"


def test_gated_fc1_local_b_is_not_a_contiguous_block():
    # Guard the test above: for the gated fc1 the [gate; up] split really differs from a contiguous one.
    kw = dict(EXCLUDE_KW, lora_B_init_method="normal")
    (ref,) = run(1, tasks.lora_parameters, SEED, kw, {"gated_linear_unit": True})
    full_b = ref["params"][f"{LAYER0}.mlp.linear_fc1.adapter.linear_out.weight"]["value"]
    assert not torch.equal(split_gated_rows(full_b, 0, 2), torch.chunk(full_b, 2, dim=0)[0])


# ------------------------------------------------------ errors and warnings


def test_rank_not_divisible_by_tp_names_module_r_and_t():
    errs = run(2, tasks.lora_error, SEED, dict(target_modules=["linear_qkv"], dim=3), {})
    for err in errs:
        assert err is not None and err["type"] == "ValueError"
        msg = err["message"]
        assert f"{LAYER0}.self_attention.linear_qkv" in msg
        assert "dim=3" in msg and "TP=2" in msg


def test_row_bases_accept_a_rank_not_divisible_by_tp():
    # A row base splits A along `in`, never along r: dim=3 is fine at TP=2.
    kw = dict(target_modules=["linear_proj", "linear_fc2"], dim=3)
    for res in run(2, tasks.lora_parameters, SEED, kw, {}):
        p = res["params"]
        assert tuple(p[f"{LAYER0}.self_attention.linear_proj.adapter.linear_in.weight"]["value"].shape) == (3, H // 2)
        assert tuple(p[f"{LAYER0}.mlp.linear_fc2.adapter.linear_out.weight"]["value"].shape) == (H // 2, 3)


@pytest.mark.parametrize("tp", [1, 2])
def test_pattern_on_a_non_linear_module_is_a_type_error(tp):
    for err in run(tp, tasks.lora_error, SEED, dict(target_modules=["input_layernorm"], dim=R), {}):
        assert err is not None and err["type"] == "TypeError", err
        assert f"{LAYER0}.input_layernorm" in err["message"]
        assert "RMSNorm" in err["message"]  # the module's type


@pytest.mark.parametrize("tp", [1, 2])
def test_unmatched_pattern_warns_naming_it(tp):
    kw = dict(target_modules=["linear_qkv", "no_such_layer"], dim=R)
    for res in run(tp, tasks.lora_parameters, SEED, kw, {}):
        assert len(res["wrapped"]) == 2
        assert len(res["warnings"]) == 1
        assert "'no_such_layer'" in res["warnings"][0]


# ------------------------------------------------------------- idempotence


TARGET_KW = dict(target_modules=["linear_qkv", "*.layers.0.*.linear_fc2", "output_layer"], dim=R, alpha=8)


@pytest.mark.parametrize("mode", ["target", "exclude"])
@pytest.mark.parametrize("tp", [1, 2])
def test_applying_twice_changes_nothing(tp, mode):
    kw = dict(TARGET_KW if mode == "target" else EXCLUDE_KW, lora_B_init_method="normal")
    for res in run(tp, tasks.lora_idempotence, SEED, kw):
        assert list(res["twice"]) == list(res["once"])
        for name, value in res["once"].items():
            assert torch.equal(res["twice"][name], value), name
        assert res["same_objects"]
        assert any(".adapter." in n for n in res["once"])
        if mode == "target":
            assert res["warnings"] == []


def test_applying_twice_in_exclude_mode_warns_nothing():
    kw = dict(EXCLUDE_KW, lora_B_init_method="normal")
    (res,) = run(1, tasks.lora_idempotence, SEED, kw)
    assert res["warnings"] == []


# ------------------------------------------------------------- lora_dtype


def _expected_delta(name: str, ranks: list[dict], rank: int) -> torch.Tensor:
    """scale * B(A(x)) in float64 from the bf16 weights, for one wrapper on one rank."""
    kind = MODULES[name][0] if name in MODULES else ("row" if name.endswith(("linear_proj", "linear_fc2")) else "column")
    scale = 8 / R
    a = [r["weights"][f"{name}.adapter.linear_in.weight"].double() for r in ranks]
    b = [r["weights"][f"{name}.adapter.linear_out.weight"].double() for r in ranks]
    xs = [r["outs"][name]["x"].to(torch.bfloat16).double() for r in ranks]
    if kind == "column":
        h = xs[rank] @ torch.cat(a, 0).T
        return scale * h @ b[rank].T
    h = sum(x @ ai.T for x, ai in zip(xs, a))
    return scale * h @ torch.cat(b, 0).T


@pytest.mark.parametrize("tp", [1, 2])
def test_lora_dtype_bfloat16_is_honoured(tp):
    ranks = run(tp, tasks.lora_dtype_forward, SEED)
    for res in ranks:
        assert res["logits_dtype"] == torch.float32
        for name, dtype in res["dtypes"].items():
            assert dtype == (torch.bfloat16 if ".adapter." in name else torch.float32), name
        assert len(res["outs"]) == 8
        for name, o in res["outs"].items():
            assert o["out_dtype"] == torch.float32, name
            expected = _expected_delta(name, ranks, res["tp_rank"])
            assert expected.abs().max() > 0
            torch.testing.assert_close(
                o["delta"].double(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item(),
                msg=lambda m, name=name: f"{name} adapter delta on TP rank {res['tp_rank']}: {m}",
            )


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("tp", [1, 2])
def test_eval_mode_dropout_is_identity(tp):
    for res in run(tp, tasks.lora_dropout, SEED):
        assert torch.equal(res["eval1"], res["eval2"])
        assert torch.equal(res["eval1"], res["no_dropout"])
        # ...while in training the same dropout really acts.
        assert not torch.allclose(res["train1"], res["eval1"])
        assert not torch.allclose(res["train1"], res["train2"])


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("tp", [1, 2])
def test_merge_of_column_and_row_shards_is_the_shard_of_the_full_merge(tp):
    out_f, in_f, r, alpha = 12, 10, 4, 6.0
    from harness.sharding import seeded_tensor

    w = seeded_tensor(SEED, "W", (out_f, in_f))
    a = seeded_tensor(SEED, "A", (r, in_f))
    b = seeded_tensor(SEED, "B", (out_f, r))
    full = (w.double() + (alpha / r) * b.double() @ a.double()).float()
    for res in run(tp, tasks.lora_merge_shards, SEED, out_f, in_f, r, alpha):
        k = res["tp_rank"]
        column = torch.chunk(full, tp, dim=0)[k]
        row = torch.chunk(full, tp, dim=1)[k]
        assert res["column"].shape == column.shape and res["row"].shape == row.shape
        torch.testing.assert_close(res["column"], column, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["row"], row, rtol=1e-6, atol=1e-6)
        assert res["bf16"].dtype == torch.bfloat16
        torch.testing.assert_close(res["bf16"].float(), column, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tp", [1, 2])
def test_merge_lora_gives_plain_layers_with_the_adapted_forward(tp):
    kw = dict(EXCLUDE_KW, lora_B_init_method="normal")
    for res in run(tp, tasks.lora_merge_model, SEED, kw):
        assert res["wrappers_left"] == []
        assert not any(".adapter." in n or ".to_wrap." in n for n in res["param_names"])
        for name, (kind, *_r) in MODULES.items():
            assert res["types"][name] == ("ColumnParallelLinear" if kind == "column" else "RowParallelLinear")
        # The adapters contribute, and the merged model computes exactly that.
        assert not torch.allclose(res["adapted"], res["base"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(res["merged"], res["adapted"], rtol=1e-4, atol=1e-5)


# ------------------------------------- row base that scatters its own input


@pytest.mark.parametrize("tp", [1, 2])
def test_row_base_with_input_not_parallel(tp):
    # RowParallelLinear(input_is_parallel=False) takes the full input and
    # scatters it itself; its adapter must do the same.
    ranks = run(tp, tasks.lora_row_input_not_parallel, SEED)
    for res in ranks:
        assert res["error"] is None, res["error"]
    w = torch.cat([r["W"] for r in ranks], dim=1).double()
    a = torch.cat([r["A"] for r in ranks], dim=1).double()
    b = torch.cat([r["B"] for r in ranks], dim=0).double()
    for res in ranks:
        x = res["x"].double()
        expected = x @ w.T + res["bias"].double() + (8 / 4) * (x @ a.T) @ b.T
        torch.testing.assert_close(res["out"].double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- VLMLoRA


class _Tower(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)


class _VLM(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.vision_model = _Tower(d)
        self.vision_projection = nn.Sequential(nn.Linear(d, d))
        self.language_model = _Tower(d)


def _vlm(training=True, **flags):
    from lora.megatron import VLMLoRA

    torch.manual_seed(0)
    model = _VLM()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern must match
        adapted = VLMLoRA(target_modules=["fc", "proj", "vision_projection.0"], dim=2, **flags)(model, training=training)
    return adapted


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_vlm_lora_default_freezes_every_subtree_but_not_adapters():
    model = _vlm()
    assert model.training
    adapters = {n for n, _ in model.named_parameters() if ".adapter." in n}
    assert len(adapters) == 2 * 5  # fc and proj in two towers, plus the projection
    assert _trainable(model) == adapters


@pytest.mark.parametrize(
    "part, flag",
    [
        ("vision_model", "freeze_vision_model"),
        ("vision_projection", "freeze_vision_projection"),
        ("language_model", "freeze_language_model"),
    ],
)
def test_vlm_lora_unfrozen_subtree_is_fully_trainable(part, flag):
    model = _vlm(**{flag: False})
    all_names = {n for n, _ in model.named_parameters()}
    adapters = {n for n in all_names if ".adapter." in n}
    subtree = {n for n in all_names if n.startswith(part + ".")}
    assert _trainable(model) == adapters | subtree
    # The unfrozen subtree still carries its adapters (fine-tuned with adapters on top).
    assert any(n.startswith(part + ".") for n in adapters)
    # Non-linear parameters of that subtree (LayerNorm) are trainable too when it is a tower.
    if part != "vision_projection":
        assert f"{part}.norm.weight" in _trainable(model)


def test_vlm_lora_adapter_forward_and_gradients():
    model = _vlm(freeze_language_model=False)
    wrapper = model.vision_model.fc
    assert hasattr(wrapper, "to_wrap") and hasattr(wrapper, "adapter")
    with torch.no_grad():
        wrapper.adapter.linear_out.weight.normal_()
    x = torch.randn(3, 6)
    out = wrapper(x)
    a, b = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    expected = wrapper.to_wrap(x) + (32 / 2) * x @ a.T @ b.T
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert a.grad is not None and b.grad is not None
    assert wrapper.to_wrap.weight.grad is None  # frozen


@pytest.mark.parametrize(
    "part, flag",
    [
        ("vision_model", "freeze_vision_model"),
        ("vision_projection", "freeze_vision_projection"),
        ("language_model", "freeze_language_model"),
    ],
)
def test_vlm_lora_training_false_freezes_flagged_subtrees_adapters_included(part, flag):
    model = _vlm(training=False, **{flag: False})
    assert not any(m.training for m in model.modules())
    all_names = {n for n, _ in model.named_parameters()}
    # Only the unflagged subtree keeps its (trainable) flags, its adapters included.
    assert _trainable(model) == {n for n in all_names if n.startswith(part + ".")}
    assert any(".adapter." in n for n in _trainable(model))
    assert _trainable(_vlm(training=False)) == set()


# ------------------------------------------- plain nn.Linear (no megatron layer)


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(5, 7, dtype=torch.float64)
        self.act = nn.ReLU()
        self.linear_fc2 = nn.Linear(7, 5, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


def test_plain_linear_gets_its_own_single_device_adapter():
    from lora.megatron import LoRA, merge_lora
    from lora.megatron.dense_adapters import LinearAdapter, LoRALinear

    torch.manual_seed(0)
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=3, alpha=6, lora_B_init_method="normal")(_Plain())
    for name in ("linear_fc1", "linear_fc2"):
        w = getattr(model, name)
        assert isinstance(w, LoRALinear) and isinstance(w.adapter, LinearAdapter)
        assert w.adapter.linear_in.weight.dtype == torch.float64
        assert w.adapter.linear_in.weight.requires_grad and not w.to_wrap.weight.requires_grad
    x = torch.randn(4, 5, dtype=torch.float64)
    w = model.linear_fc1
    a, b = w.adapter.linear_in.weight, w.adapter.linear_out.weight
    torch.testing.assert_close(w(x), w.to_wrap(x) + 2.0 * x @ a.T @ b.T, rtol=1e-12, atol=1e-12)
    model.eval()
    adapted = model(x)
    merged = merge_lora(model)
    assert isinstance(merged.linear_fc1, nn.Linear) and isinstance(merged.linear_fc2, nn.Linear)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-12, atol=1e-12)


def test_plain_linear_training_false_and_lora_dtype():
    from lora.megatron import LoRA

    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=2, lora_dtype=torch.bfloat16)(_Plain(), training=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.linear_fc2.adapter.linear_out.weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 5, dtype=torch.float64)).dtype == torch.float64


def test_megatron_lora_merge_tp1_formula():
    from lora.megatron import LoRAMerge

    base, B, A = torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(3, 1), torch.ones(1, 2)
    merged = LoRAMerge().merge(base, B, A, 4, 2)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, torch.full((3, 2), 3.0, dtype=torch.bfloat16))
