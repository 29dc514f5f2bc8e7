"""Tests of harness.bridge: Megatron-Bridge's own LoRA imported and run on CPU, honestly.

* the import: in a fresh interpreter, ``import_bridge_lora()`` gives Bridge's
  ``LoRA`` / ``VLMLoRA`` / ``LoRAMerge``; Bridge's ``HAVE_TE`` flags are all
  False; no ``transformer_engine`` entry is left in ``sys.modules``;
  megatron-core's TE extension module and its version probe are what they
  were; ``megatron/bridge/__init__.py``, ``megatron.training`` and Bridge's
  ``common_utils`` were never run; the placeholders refuse to be used;
* values at world size 1: LoRA on megatron-core ``ColumnParallelLinear`` /
  ``RowParallelLinear`` computes base + (alpha/dim) B A x, and
  ``LoRAMerge().merge`` computes base + (alpha/dim) B A;
* values at TP=2 (two spawned gloo ranks with ``harness.cpu``): the same
  with and without sequence parallelism and with ``a2a_experimental``;
  SequentialMLP experts at ETP=2: the column expert's adapter computes its
  formula, the row expert's does not (Bridge's, observed and pinned here);
* what Bridge refuses on CPU, with the exception it raises (grouped-expert
  stand-in, a bare LLaVAModel) and what it adapts (SequentialMLP experts,
  the router, ``[LLaVAModel]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

from harness import bridge

if not bridge.bridge_installed():
    pytest.skip(
        "megatron-bridge is not installed (pip install --no-deps megatron-bridge==0.6.2): nothing to check",
        allow_module_level=True,
    )

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Dimensions of the tiny linears: hidden H, column output OUT, LoRA rank DIM.
H, OUT, DIM, ALPHA, S, B = 8, 12, 4, 6, 4, 2
SCALE = ALPHA / DIM


def _seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ import


_FRESH_IMPORT = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
import megatron.core.extensions.transformer_engine as te_ext_before
import megatron.core.utils as mcu
from harness import bridge

te_version_cache_before = mcu._te_version
out = {}

# A failed attempt (lora_merge made unimportable) leaves nothing behind and can be retried.
import importlib.abc
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megatron.bridge.peft.lora_merge":
            raise ImportError("refused by the test")
        return None
sys.meta_path.insert(0, _Refuse())
try:
    bridge.import_bridge_lora()
    out["failed_attempt"] = "imported"
except bridge.BridgeImportError as exc:
    out["failed_attempt"] = [
        "refused by the test" in str(exc),
        sorted(n for n in sys.modules if n.startswith("megatron.bridge")),
        hasattr(sys.modules["megatron"], "bridge"),
        sorted(n for n in sys.modules if n.startswith("transformer_engine")),
        sys.modules.get("megatron.core.extensions.transformer_engine") is te_ext_before,
        "megatron.bridge.utils.common_utils" in sys.modules,
    ]
sys.meta_path.pop(0)

lora = bridge.import_bridge_lora()
out["same_module_again"] = bridge.import_bridge_lora() is lora
impl = bridge.bridge_impl_module()
import megatron.bridge.peft.lora_merge as lm
out["classes"] = [impl.LoRA is lora.LoRA, impl.VLMLoRA is lora.VLMLoRA, impl.LoRAMerge is lm.LoRAMerge,
                  impl.LoRAMerge is bridge.bridge_lora_merge(), bridge.bridge_impl_module() is impl]
out["caps"] = impl.LORA_HARNESS_CAPABILITIES
out["flags"] = bridge.te_flags()
out["te_in_sys_modules"] = sorted(n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine."))
out["te_ext_same"] = sys.modules["megatron.core.extensions.transformer_engine"] is te_ext_before
out["te_ext_have_te"] = te_ext_before.HAVE_TE
out["te_version_cache_untouched"] = mcu._te_version is te_version_cache_before
out["get_te_version"] = str(mcu.get_te_version())
out["is_te_min_version_1"] = mcu.is_te_min_version("1.0.0")
try:
    import transformer_engine  # noqa: F401
    out["te_import"] = "imported"
except ImportError as exc:
    out["te_import"] = type(exc).__name__
out["report"] = bridge.WINDOW_REPORT
import megatron.bridge as mb
out["bare_package"] = [hasattr(mb, "AutoBridge"), "megatron.bridge.models" in sys.modules,
                       "megatron.training" in sys.modules, "megatron.bridge.utils.common_utils" in sys.modules]
import megatron.bridge.peft.recompute as rc
out["print_rank_0_is_harness"] = rc.print_rank_0.__module__
import megatron.bridge.peft.lora_layers as ll
te = ll.te
out["placeholder"] = [te.__name__, te.Linear.__name__, te.LayerNormLinear.__name__,
                      "Transformer Engine" in (te.Linear.__doc__ or "")]
refusals = {}
for label, use in (("Linear", lambda: te.Linear(2, 2)), ("ops.Sequential", lambda: te.ops.Sequential()),
                   ("fp8_autocast", lambda: te.fp8_autocast(enabled=False)), ("other", lambda: te.GroupedLinear)):
    try:
        use()
        refusals[label] = "no error"
    except Exception as exc:
        refusals[label] = [type(exc).__name__, "Transformer Engine is not installed" in str(exc)]
out["refusals"] = refusals
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def fresh_import():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FRESH_IMPORT)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT"):])


def test_failed_import_leaves_nothing_behind(fresh_import):
    # message names the cause; no megatron.bridge module, no TE placeholder or stub is left;
    # megatron-core's extension module is back; the retry (the other tests) succeeds.
    assert fresh_import["failed_attempt"] == [True, [], False, [], True, False]


def test_import_gives_bridges_own_classes(fresh_import):
    assert fresh_import["same_module_again"]
    assert fresh_import["classes"] == [True] * 5
    assert fresh_import["caps"] == bridge.BRIDGE_CAPABILITIES
    from harness.contract import Capabilities

    caps = Capabilities.from_mapping(fresh_import["caps"])
    assert caps.contract == "bridge" and caps.init_methods == ("xavier", "kaiming", "normal", "zero")
    assert caps.lora_dtypes == (None,)
    assert caps.experts and not caps.grouped_experts and caps.sequence_parallel and caps.a2a


def test_bridge_sees_no_transformer_engine(fresh_import):
    flags = fresh_import["flags"]
    assert "megatron.bridge.peft.utils.HAVE_TE" in flags and "megatron.bridge.peft.module_matcher.HAVE_TE" in flags
    assert len(flags) >= 12, flags  # HAVE_TE and every HAVE_TE_* of both modules
    assert not any(flags.values()), {k: v for k, v in flags.items() if v}


def test_no_transformer_engine_left_and_megatron_detection_unchanged(fresh_import):
    assert fresh_import["te_in_sys_modules"] == []
    assert fresh_import["te_import"] == "ModuleNotFoundError"
    # megatron-core's own extension module is the one it had, still without TE.
    assert fresh_import["te_ext_same"] and fresh_import["te_ext_have_te"] is False
    assert fresh_import["te_version_cache_untouched"]
    assert fresh_import["get_te_version"] == "0.0.0" and fresh_import["is_te_min_version_1"] is False
    report = fresh_import["report"]
    assert report["te_installed"] is False and report["foreign_modules"] == []
    assert set(report["blocked"]) == {"megatron.core.extensions.transformer_engine", "transformer_engine", "transformer_engine.pytorch"}
    assert set(report["stubs"]) == {"megatron.bridge.utils.common_utils", "transformer_engine.pytorch"}


def test_only_peft_was_run(fresh_import):
    # megatron/bridge/__init__.py (AutoBridge, every model bridge), megatron.training
    # and Bridge's common_utils were never imported; recompute got the harness's print_rank_0.
    assert fresh_import["bare_package"] == [False, False, False, False]
    assert fresh_import["print_rank_0_is_harness"] == "harness.bridge"


def test_te_placeholder_refuses_use(fresh_import):
    name, linear, ln_linear, documented = fresh_import["placeholder"]
    assert name == "transformer_engine.pytorch" and linear == "_AbsentTELinear"
    assert ln_linear == "_AbsentTELayerNormLinear" and documented
    refusals = fresh_import["refusals"]
    assert refusals["Linear"] == ["RuntimeError", True]
    assert refusals["ops.Sequential"] == ["RuntimeError", True]
    assert refusals["fp8_autocast"] == ["RuntimeError", True]
    assert refusals["other"] == ["AttributeError", True]


def test_names_and_version():
    assert bridge.BRIDGE_MODULE == "megatron.bridge.peft.lora"
    assert bridge.is_bridge("megatron.bridge.peft.lora") and bridge.is_bridge("megatron.bridge.peft")
    assert not bridge.is_bridge("lora.megatron") and not bridge.is_bridge(None)
    from importlib.metadata import version

    assert bridge.bridge_version() == version("megatron-bridge")


# ------------------------------------------------------- world size 1


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """CPU mode, a 1-rank gloo group and megatron's parallel_state at TP=1; Bridge imported."""
    from harness import cpu
    from megatron.core import parallel_state

    was_active = cpu.is_active()
    cpu.rank_initializer(types.SimpleNamespace(backend="gloo"))
    lora = bridge.import_bridge_lora()
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
    cpu.seed_model_parallel(0)
    yield lora
    if made_mp:
        parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()
    if not was_active:
        cpu.deactivate()


def _apply(lora_module, model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_module.LoRA(**kwargs)(model)


class _Block(nn.Module):
    """A megatron-core column-parallel then row-parallel linear, built as harness.families.gpt.model builds layers."""

    def __init__(self, tp: int, sequence_parallel: bool = False, bias: bool = True):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        from harness.families.gpt.model import GPTShape, transformer_config

        cfg = transformer_config(GPTShape(), tp=tp, sequence_parallel=sequence_parallel)
        group = parallel_state.get_tensor_model_parallel_group()
        self.linear_fc1 = ColumnParallelLinear(
            H, OUT, config=cfg, init_method=nn.init.zeros_, bias=bias, gather_output=False, tp_group=group
        )
        self.linear_fc2 = RowParallelLinear(
            OUT, H, config=cfg, init_method=nn.init.zeros_, bias=bias, input_is_parallel=True, skip_bias_add=True,
            tp_group=group,
        )


def test_lora_on_megatron_linears_at_world_size_one(world_of_one):
    lora = world_of_one
    block = _Block(tp=1)
    W1, b1, W2, b2 = _seeded(1, OUT, H), _seeded(2, OUT), _seeded(3, H, OUT), _seeded(4, H)
    with torch.no_grad():
        block.linear_fc1.weight.copy_(W1)
        block.linear_fc1.bias.copy_(b1)
        block.linear_fc2.weight.copy_(W2)
        block.linear_fc2.bias.copy_(b2)
    block = _apply(lora, block, dim=DIM, alpha=ALPHA, target_modules=["linear_fc1", "linear_fc2"])
    fc1, fc2 = block.linear_fc1, block.linear_fc2
    assert type(fc1).__name__ == type(fc2).__name__ == "LoRALinear"
    assert type(fc1).__module__ == "megatron.bridge.peft.lora_layers"
    names = {n: tuple(p.shape) for n, p in block.named_parameters() if ".adapter." in n}
    assert names == {
        "linear_fc1.adapter.linear_in.weight": (DIM, H), "linear_fc1.adapter.linear_out.weight": (OUT, DIM),
        "linear_fc2.adapter.linear_in.weight": (DIM, OUT), "linear_fc2.adapter.linear_out.weight": (H, DIM),
    }
    # Bridge's default B is zero: set B (and A) to known non-zero values.
    A1, B1, A2, B2 = _seeded(5, DIM, H), _seeded(6, OUT, DIM), _seeded(7, DIM, OUT), _seeded(8, H, DIM)
    with torch.no_grad():
        fc1.adapter.linear_in.weight.copy_(A1)
        fc1.adapter.linear_out.weight.copy_(B1)
        fc2.adapter.linear_in.weight.copy_(A2)
        fc2.adapter.linear_out.weight.copy_(B2)
    x = _seeded(9, S, B, H)
    y, bias1 = fc1(x)
    assert bias1 is None  # added inside (skip_bias_add=False)
    torch.testing.assert_close(y, x @ W1.T + b1 + SCALE * (x @ A1.T @ B1.T), rtol=1e-5, atol=1e-5)
    z, bias2 = fc2(y)
    assert bias2 is fc2.to_wrap.bias  # skip_bias_add=True: returned, not added
    torch.testing.assert_close(z, y @ W2.T + SCALE * (y @ A2.T @ B2.T), rtol=1e-5, atol=1e-5)
    (z * _seeded(10, *z.shape)).sum().backward()
    for name, p in block.named_parameters():
        if ".adapter." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_lora_merge_at_world_size_one(world_of_one):
    from megatron.core import parallel_state

    merge = bridge.bridge_lora_merge()
    assert merge.__module__ == "megatron.bridge.peft.lora_merge"
    group = parallel_state.get_tensor_model_parallel_group()
    assert group.size() == 1
    base, b_mat, a_mat = _seeded(11, OUT, H), _seeded(12, OUT, DIM), _seeded(13, DIM, H)
    merged = merge().merge(base, b_mat, a_mat, ALPHA, DIM, tp_group=group)
    torch.testing.assert_close(merged, base + SCALE * (b_mat @ a_mat), rtol=0, atol=1e-6)
    # The merged weight is what the adapted column linear computes.
    block = _Block(tp=1, bias=False)
    with torch.no_grad():
        block.linear_fc1.weight.copy_(base)
    block = _apply(world_of_one, block, dim=DIM, alpha=ALPHA, target_modules=["linear_fc1"])
    with torch.no_grad():
        block.linear_fc1.adapter.linear_in.weight.copy_(a_mat)
        block.linear_fc1.adapter.linear_out.weight.copy_(b_mat)
    x = _seeded(14, S, B, H)
    torch.testing.assert_close(block.linear_fc1(x)[0], x @ merged.T, rtol=1e-5, atol=1e-5)


def _tiny_moe(grouped: bool):
    from harness.families.moe.model import MoEShape, build_moe_gpt

    return build_moe_gpt(MoEShape(num_layers=1, grouped=grouped), tp=1)


def test_grouped_expert_stand_in_is_refused(world_of_one):
    # peft/utils.py:643: only TE grouped linears and megatron's Column/RowParallelLinear are known.
    model = _tiny_moe(grouped=True)
    with pytest.raises(NotImplementedError, match="Layer type is unrecognized for LoRA: .*TorchColumnParallelGroupedLinear"):
        _apply(world_of_one, model, dim=DIM, target_modules=["linear_fc1"])


def test_sequential_experts_and_router_are_adapted(world_of_one):
    model = _apply(world_of_one, _tiny_moe(grouped=False), dim=DIM, target_modules=["linear_fc1", "router"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("linear_fc1", "router"))}
    assert kinds["decoder.layers.0.mlp.router"] == "LoRATopKRouter"
    experts = [n for n in kinds if ".local_experts." in n]
    assert experts and all(kinds[n] == "LoRALinear" for n in experts)
    assert all(model.get_submodule(n).adapter.is_expert for n in experts)


def test_vlm_lora_takes_a_list_of_chunks_only(world_of_one):
    from harness.families.vlm.model import VLMShape, build_vlm

    lora = world_of_one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="not subscriptable"):  # lora.py:240, unwrap_model(model)[0]
            lora.VLMLoRA(dim=DIM)(build_vlm(VLMShape(), tp=1))
        model = build_vlm(VLMShape(), tp=1)
        lora.VLMLoRA(dim=DIM)([model])
    adapted = [n for n, p in model.named_parameters() if ".adapter." in n]
    assert any(n.startswith("language_model.") for n in adapted)
    assert all(p.requires_grad == (".adapter." in n) for n, p in model.named_parameters())


# ------------------------------------------------------------- TP = 2


def _tp2_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """One of two spawned gloo ranks: Bridge's LoRA on megatron's linears at TP=2, three ways."""
    from harness import cpu

    cpu.rank_initializer(types.SimpleNamespace(backend="gloo"))
    lora = bridge.import_bridge_lora()
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    cpu.seed_model_parallel(0)
    o, h, d = OUT // world, H // world, DIM // world
    W1, W2 = _seeded(1, OUT, H), _seeded(2, H, OUT)
    A1, B1, A2, B2 = _seeded(3, DIM, H), _seeded(4, OUT, DIM), _seeded(5, DIM, OUT), _seeded(6, H, DIM)
    x = _seeded(7, S, B, H)
    results = {}
    for mode in ("plain", "sp", "sp_a2a"):
        sp = mode != "plain"
        block = _Block(tp=world, sequence_parallel=sp, bias=False)
        with torch.no_grad():
            block.linear_fc1.weight.copy_(W1[rank * o:(rank + 1) * o])
            block.linear_fc2.weight.copy_(W2[:, rank * o:(rank + 1) * o])
        block = _apply(lora, block, dim=DIM, alpha=ALPHA, a2a_experimental=mode == "sp_a2a",
                       target_modules=["linear_fc1", "linear_fc2"])
        fc1, fc2 = block.linear_fc1, block.linear_fc2
        shapes = {n: tuple(p.shape) for n, p in block.named_parameters() if ".adapter." in n}
        # Column base: A split along dim, B along out; row base: A along in, B along out.
        with torch.no_grad():
            fc1.adapter.linear_in.weight.copy_(A1[rank * d:(rank + 1) * d])
            fc1.adapter.linear_out.weight.copy_(B1[rank * o:(rank + 1) * o])
            fc2.adapter.linear_in.weight.copy_(A2[:, rank * o:(rank + 1) * o])
            fc2.adapter.linear_out.weight.copy_(B2[rank * h:(rank + 1) * h])
        calls = [0]
        real_all_to_all = dist.all_to_all

        def counting_all_to_all(*args, **kwargs):
            calls[0] += 1
            return real_all_to_all(*args, **kwargs)

        dist.all_to_all = counting_all_to_all
        try:
            y, _ = fc1(x.chunk(world, 0)[rank] if sp else x)
            z, _ = fc2(y)
            (z * _seeded(8, *z.shape)).sum().backward()
        finally:
            dist.all_to_all = real_all_to_all
        results[mode] = {
            "y": y.detach(), "z": z.detach(), "shapes": shapes, "all_to_all_calls": calls[0],
            "grads": {n: p.grad.detach().clone() for n, p in block.named_parameters() if ".adapter." in n},
        }
    results["experts"] = _expert_adapters_at_etp2(lora, rank, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _expert_adapters_at_etp2(lora, rank: int, world: int) -> dict:
    """SequentialMLP expert 0's adapters at TP=ETP=2 with SP (allgather dispatcher): what each computes.

    Returns, for fc1 (column) and fc2 (row), the largest difference from the
    adapter's formula and the formula's largest magnitude. For fc2 the row
    base's output is a partial sum that the dispatcher adds up over ETP, so
    the adapter's outputs are compared summed over the ranks too.
    """
    from megatron.core import parallel_state

    from harness import cpu
    from harness.families.gpt.model import causal_mask
    from harness.families.moe.model import MoEShape, build_moe_gpt

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(world, expert_tensor_parallel_size=world)
    cpu.seed_model_parallel(0)
    model = build_moe_gpt(MoEShape(num_layers=1, dispatcher="allgather"), tp=world, sequence_parallel=True)
    cpu.patch_loaded_modules()
    model = _apply(lora, model, dim=DIM, alpha=ALPHA, target_modules=["linear_fc1", "linear_fc2"],
                   lora_B_init_method="normal")
    expert = model.decoder.layers[0].mlp.experts.local_experts[0]
    seen = {}
    for name in ("linear_fc1", "linear_fc2"):
        getattr(expert, name).adapter.register_forward_hook(
            lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].detach(), out.detach())))
    s, b = 8, 2
    x = _seeded(20, s, b, 32).chunk(world, 0)[rank]
    with torch.no_grad():
        model(torch.zeros(b, s, dtype=torch.long), torch.arange(s).unsqueeze(0).expand(b, s), causal_mask(s),
              decoder_input=x)

    def gathered(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    out = {}
    x1, y1 = seen["linear_fc1"]
    a1, b1 = expert.linear_fc1.adapter.linear_in.weight.detach(), expert.linear_fc1.adapter.linear_out.weight.detach()
    want1 = SCALE * (x1 @ gathered(a1).T @ b1.T)  # A split along dim (gathered), B along out (this rank's rows)
    out["fc1"] = (int(x1.shape[0]), float((y1 - want1).abs().max()), float(want1.abs().max()))
    x2, y2 = seen["linear_fc2"]
    a2, b2 = expert.linear_fc2.adapter.linear_in.weight.detach(), expert.linear_fc2.adapter.linear_out.weight.detach()
    partial = x2 @ a2.T  # A split along in: this rank's part of A x
    dist.all_reduce(partial)
    want2 = SCALE * (partial @ gathered(b2).T)
    got2 = y2.clone()
    dist.all_reduce(got2)  # as the dispatcher adds the row experts' outputs over ETP
    out["fc2"] = (int(x2.shape[0]), float((got2 - want2).abs().max()), float(want2.abs().max()))
    return out


def test_lora_on_megatron_linears_at_tp2(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(_tp2_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    W1, W2 = _seeded(1, OUT, H), _seeded(2, H, OUT)
    A1, B1, A2, B2 = _seeded(3, DIM, H), _seeded(4, OUT, DIM), _seeded(5, DIM, OUT), _seeded(6, H, DIM)
    x = _seeded(7, S, B, H)
    y_full = x @ W1.T + SCALE * (x @ A1.T @ B1.T)
    z_full = y_full @ W2.T + SCALE * (y_full @ A2.T @ B2.T)
    # Gradients of the same functional of the full output, on one device.
    full = {k: t.clone().requires_grad_(True) for k, t in {"A1": A1, "B1": B1, "A2": A2, "B2": B2}.items()}
    y_ad = x @ W1.T + SCALE * (x @ full["A1"].T @ full["B1"].T)
    z_ad = y_ad @ W2.T + SCALE * (y_ad @ full["A2"].T @ full["B2"].T)
    (z_ad * _seeded(8, *z_ad.shape)).sum().backward()
    o, h, d = OUT // world, H // world, DIM // world
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["plain"]["shapes"] == {
            "linear_fc1.adapter.linear_in.weight": (DIM // world, H),
            "linear_fc1.adapter.linear_out.weight": (o, DIM),
            "linear_fc2.adapter.linear_in.weight": (DIM, o),
            "linear_fc2.adapter.linear_out.weight": (H // world, DIM),
        }
        for mode in ("plain", "sp", "sp_a2a"):
            r = res[mode]
            torch.testing.assert_close(r["y"], y_full[..., rank * o:(rank + 1) * o], rtol=1e-5, atol=1e-5)
            z_expected = z_full.chunk(world, 0)[rank] if mode != "plain" else z_full
            torch.testing.assert_close(r["z"], z_expected, rtol=1e-4, atol=1e-4)
        shard = {
            "linear_fc1.adapter.linear_in.weight": full["A1"].grad[rank * d:(rank + 1) * d],
            "linear_fc1.adapter.linear_out.weight": full["B1"].grad[rank * o:(rank + 1) * o],
            "linear_fc2.adapter.linear_in.weight": full["A2"].grad[:, rank * o:(rank + 1) * o],
            "linear_fc2.adapter.linear_out.weight": full["B2"].grad[rank * h:(rank + 1) * h],
        }
        for name, expected in shard.items():
            torch.testing.assert_close(res["plain"]["grads"][name], expected, rtol=1e-4, atol=1e-4)
        # a2a: the list form of all_to_all runs on gloo, once forward and once backward,
        # and gives the gradients of the gather/scatter path.
        assert res["plain"]["all_to_all_calls"] == res["sp"]["all_to_all_calls"] == 0
        assert res["sp_a2a"]["all_to_all_calls"] == 2
        for name, g in res["sp"]["grads"].items():
            torch.testing.assert_close(res["sp_a2a"]["grads"][name], g, rtol=1e-5, atol=1e-5)
        # SequentialMLP experts at ETP=2: the column expert's adapter computes its formula; the row
        # expert's does not (observed with Bridge 0.6.2 and megatron-core 0.19.2): its A is megatron's
        # RowParallelLinear(is_expert=True), whose output is left unreduced (explicit_expert_comm), and
        # its B gathers each rank's B_r (A_r x_r) instead of B_r (A x) (peft/utils.py:1007, :1047).
        tokens1, diff1, size1 = res["experts"]["fc1"]
        tokens2, diff2, size2 = res["experts"]["fc2"]
        assert tokens1 > 0 and tokens2 > 0
        assert diff1 <= 1e-5 * max(size1, 1.0), res["experts"]
        assert diff2 > 0.1 * size2, res["experts"]
