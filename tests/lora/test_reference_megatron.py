"""Tests of lora.reference on real megatron-core Column/RowParallelLinear layers at world size 1 (CPU, gloo)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lora.reference import LoRA, LoRALinear, merge_lora

parallel_state = pytest.importorskip("megatron.core.parallel_state")
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A single-process gloo group with megatron model parallel state at TP=1."""
    owned = not dist.is_initialized()
    if owned:
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip("a process group of size > 1 is already initialised in this process")
    made_mp = not parallel_state.model_parallel_is_initialized()
    if made_mp:
        parallel_state.initialize_model_parallel(1)
    elif parallel_state.get_tensor_model_parallel_world_size() != 1:
        pytest.skip("megatron model parallel state with TP > 1 already initialised")
    yield
    if made_mp:
        parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()


def _config(dtype=torch.float32):
    return ModelParallelConfig(use_cpu_initialization=True, params_dtype=dtype)


class Block(nn.Module):
    def __init__(self, h=6, dtype=torch.float32):
        super().__init__()
        cfg = _config(dtype)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.linear_qkv = ColumnParallelLinear(
            h, 3 * h, config=cfg, init_method=nn.init.xavier_normal_, bias=True, gather_output=False,
            tp_group=tp_group,
        )
        self.linear_proj = RowParallelLinear(
            3 * h, h, config=cfg, init_method=nn.init.xavier_normal_, bias=True,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp_group,
        )
        with torch.no_grad():  # megatron zero-inits biases; non-zero ones test the bias path
            self.linear_qkv.bias.normal_()
            self.linear_proj.bias.normal_()

    def forward(self, x):
        h, _ = self.linear_qkv(x)
        out, bias = self.linear_proj(h)
        return out + bias


def _apply(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return LoRA(**kwargs)(model)


def test_megatron_linears_are_linear_type(world_of_one):
    # Exclude mode adapts every linear-type module: megatron's parallel linears are ones.
    block = LoRA(target_modules=[], exclude_modules=["nothing"], dim=2)
    with pytest.warns(UserWarning, match="'nothing'"):
        out = block(Block())
    assert isinstance(out.linear_qkv, LoRALinear) and isinstance(out.linear_proj, LoRALinear)


def test_column_and_row_parallel_adapters_at_world_size_one(world_of_one):
    torch.manual_seed(0)
    block = _apply(Block(), dim=4, alpha=8, lora_B_init_method="normal")
    qkv, proj = block.linear_qkv, block.linear_proj
    assert isinstance(qkv, LoRALinear) and isinstance(proj, LoRALinear)
    assert qkv.adapter.linear_in.weight.shape == (4, 6) and qkv.adapter.linear_out.weight.shape == (18, 4)
    assert proj.adapter.linear_in.weight.shape == (4, 18) and proj.adapter.linear_out.weight.shape == (6, 4)

    x = torch.randn(5, 2, 6)  # [sequence, batch, hidden]
    out, bias = qkv(x)
    assert bias is None  # bias added inside (skip_bias_add=False)
    Wq, bq = qkv.to_wrap.weight, qkv.to_wrap.bias
    Aq, Bq = qkv.adapter.linear_in.weight, qkv.adapter.linear_out.weight
    expected = x @ Wq.T + bq + 2.0 * (x @ Aq.T @ Bq.T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    out2, bias2 = proj(out)
    assert bias2 is proj.to_wrap.bias  # skip_bias_add: tuple kept, bias returned untouched
    Wp, Ap, Bp = proj.to_wrap.weight, proj.adapter.linear_in.weight, proj.adapter.linear_out.weight
    torch.testing.assert_close(out2, out @ Wp.T + 2.0 * (out @ Ap.T @ Bp.T), rtol=1e-5, atol=1e-5)


def test_megatron_gradients_reach_only_adapters(world_of_one):
    torch.manual_seed(1)
    block = _apply(Block(), dim=2, lora_B_init_method="normal")
    block(torch.randn(3, 2, 6)).square().sum().backward()
    for name, p in block.named_parameters():
        if ".adapter." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_megatron_lora_dtype_and_merge(world_of_one):
    torch.manual_seed(2)
    block = _apply(Block(), dim=2, alpha=3, lora_dtype=torch.bfloat16, lora_B_init_method="normal")
    assert block.linear_qkv.adapter.linear_in.weight.dtype == torch.bfloat16
    x = torch.randn(3, 2, 6)
    block.eval()
    adapted = block(x)
    assert adapted.dtype == torch.float32
    merged = merge_lora(block)
    assert isinstance(merged.linear_qkv, ColumnParallelLinear) and isinstance(merged.linear_proj, RowParallelLinear)
    # merged in float32, adapted in bf16: equal up to bf16 rounding of the adapter branch
    torch.testing.assert_close(merged(x), adapted, rtol=2e-2, atol=2e-2)


def test_megatron_apply_twice_changes_nothing(world_of_one):
    torch.manual_seed(3)
    block = _apply(Block(), dim=2, lora_B_init_method="normal")
    # megatron adds `_extra_state` entries that are None
    before = {k: v.clone() for k, v in block.state_dict().items() if isinstance(v, torch.Tensor)}
    _apply(block, dim=2, lora_B_init_method="normal")
    after = {k: v for k, v in block.state_dict().items() if isinstance(v, torch.Tensor)}
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert any(".adapter.linear_out." in k for k in before)


def test_megatron_layer_of_a_tp_group_larger_than_one_is_refused(world_of_one, monkeypatch):
    block = Block()
    # A real TP=2 group needs two processes; pretend the layer's group has two ranks.
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"linear_qkv \(ColumnParallelLinear\) is sharded over a TP group of size 2"):
        _apply(block, dim=2)
