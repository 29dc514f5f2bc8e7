"""megatron-core MoE on CPU with gloo: GPTs with MoE layers at TP x EP x ETP equal the world-size-1 model.

Proven by values, in float64:

* ``TorchGroupedLinear`` (column and row flavour, with and without bias,
  with empty experts) equals a per-expert loop of plain matmuls, forward and
  backward; at ETP=2 it holds each expert's shard with megatron's attributes;
* ``build_moe_gpt`` at world size 1 gives the same logits and gradients with
  SequentialMLP and grouped experts and with both token dispatchers (same
  full weights), and its routing reaches every expert in every layer;
* at tp1-ep2, tp2-sp, tp2-ep1-etp1-sp (2 ranks) and tp2-ep2-etp1-sp,
  tp2-ep2-sp, tp1-ep4, tp1-ep2-etp2 (4 ranks; allgather at the first and the
  last only), for both dispatchers and both expert kinds, the logits, the (sequence-gathered) input gradient and every
  parameter gradient (unsharded over TP / ETP, gathered over EP) equal the
  world-size-1 model's; the routers' token counts per expert, summed over
  one data-parallel replica, equal world size 1's;
* shared experts too (tp1-ep2 and tp2-ep2-sp);
* the CPU overrides are needed: without ``maybe_move_tensor_to_cpu``'s the
  alltoall dispatcher's ``all_to_all_single`` rejects the split sizes;
  without the uneven gather, gloo refuses the expert-TP gather.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from harness.families.gpt.model import ShapeError  # noqa: E402
from harness.families.moe.model import MoEShape  # noqa: E402
from harness.sharding import unshard  # noqa: E402
from tests.helpers import moe_tasks as tasks  # noqa: E402

POOL_KW = dict(
    initializer="harness.cpu:rank_initializer",
    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
)
SEED = 11
TOL = 1e-9


# Building megatron's groups for a new 4-rank layout is many gloo group
# creations; on a loaded 2-core machine that alone can exceed the adaptive
# task timeout, so these tasks get an explicit, generous one (a hang guard,
# not a speed target).
TASK_TIMEOUT_S = 180


def pool(world_size: int):
    from harness.pool import get_pool

    return get_pool(world_size, "gloo", **POOL_KW)


def _close(actual, expected, what, tol=TOL):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _run(world_size, layout, dtype=torch.float64, **shape_kw):
    ranks = pool(world_size).run(tasks.moe_forward_backward, SEED, layout, shape_kw, dtype, timeout=TASK_TIMEOUT_S)
    for r in ranks:
        assert r["error"] is None, f"{layout} {shape_kw} rank {r['rank']}: {r['error']['type']}: {r['error']['message'][:500]}"
    return ranks


_REF: dict = {}


def _reference(dtype=torch.float64, **shape_kw):
    key = (dtype, *sorted(shape_kw.items()))
    if key not in _REF:
        (_REF[key],) = _run(1, "tp1", dtype, **shape_kw)
    return _REF[key]


# ------------------------------------------------------------ grouped linear


@pytest.mark.parametrize("mode", ["column", "row"])
def test_grouped_linear_equals_per_expert_loop(mode):
    # (bias, skip_bias_add) x splits with an empty expert; world size 1.
    for bias, skip in [(False, False), (True, False), (True, True)]:
        for splits in ([3, 0, 5], [4, 4, 1]):
            (r,) = pool(1).run(tasks.grouped_linear_vs_loop, SEED, mode, splits, bias, skip)
            what = f"{mode} bias={bias} skip={skip} splits={splits}"
            names = {f"weight{i}" for i in range(len(splits))} | ({f"bias{i}" for i in range(len(splits))} if bias else set())
            assert set(r["names"]) == names, r["names"]
            _close(r["out"], r["ref"], f"{what} output", 1e-12)
            _close(r["x_grad"], r["ref_x_grad"], f"{what} input grad", 1e-12)
            for i, (g, ref) in enumerate(zip(r["w_grads"], r["ref_w_grads"])):
                _close(g, ref, f"{what} weight{i} grad", 1e-12)
                if splits[i] == 0:
                    assert torch.count_nonzero(g) == 0, f"{what}: expert {i} had no tokens but a weight grad"
            assert len(r["b_grads"]) == (len(splits) if bias else 0)
            for i, (g, ref) in enumerate(zip(r["b_grads"], r["ref_b_grads"])):
                _close(g, ref, f"{what} bias{i} grad", 1e-12)
            assert r["out_bias_is_list"] == (bias and skip)


def test_grouped_linear_shards_over_expert_tp():
    # At ETP=2 each rank holds half of every expert's weight, marked as megatron marks TE's.
    for mode, dim, shape in [("column", 0, (4, 12)), ("row", 1, (8, 6))]:
        ranks = pool(2).run(tasks.grouped_linear_vs_loop, SEED, mode, [2, 3], False, False)
        for r in ranks:
            assert r["shapes"] == [shape, shape], (mode, r["shapes"])
            # ETP == TP and EP == 1: expert gradients reduce like dense ones (allreduce=True).
            assert r["attrs"] == [(True, dim, True)] * 2
            _close(r["out"], r["ref"], f"{mode} ETP=2 local output", 1e-12)


def test_grouped_linear_fulfils_megatrons_builder_protocols():
    import inspect

    from megatron.core.transformer.moe.experts import GroupedLinearFc1Builder

    from harness.families.moe.model import TorchColumnParallelGroupedLinear, TorchRowParallelGroupedLinear

    wanted = inspect.signature(GroupedLinearFc1Builder.__call__).parameters
    kw_only = {n for n, p in wanted.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for cls in (TorchColumnParallelGroupedLinear, TorchRowParallelGroupedLinear):
        have = inspect.signature(cls.__init__).parameters
        # positional (num_local_experts, input_size, output_size) then **kwargs taking every keyword
        assert list(have)[1:4] == ["num_local_experts", "input_size", "output_size"], cls
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in have.values()), cls
        base = inspect.signature(cls.__mro__[1].__init__).parameters
        assert kw_only <= set(base), (cls, kw_only - set(base))


# ------------------------------------------------------------ expert names


def test_expert_param_names_and_dense_names():
    from harness.sharding import expert_param

    assert expert_param("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight") == (
        "decoder.layers.0.mlp.experts.{e}.linear_fc1.weight", 1)
    assert expert_param("decoder.layers.1.mlp.experts.linear_fc2.weight3") == (
        "decoder.layers.1.mlp.experts.{e}.linear_fc2.weight", 3)
    assert expert_param("decoder.layers.1.mlp.experts.linear_fc1.bias0") == (
        "decoder.layers.1.mlp.experts.{e}.linear_fc1.bias", 0)
    # Dense, router and shared-expert parameters load by the dense rules.
    for name in (
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.mlp.linear_fc1.to_wrap.weight",
    ):
        assert expert_param(name) is None, name


# --------------------------------------------------------------- shape rules


def test_shape_rules():
    MoEShape().check(1)
    with pytest.raises(ShapeError, match="num_experts=4 must be divisible by EP=8"):
        MoEShape().check(1, ep=8)
    with pytest.raises(ShapeError, match="moe_ffn_hidden_size=16 must be divisible by ETP=3"):
        MoEShape().check(1, etp=3)
    with pytest.raises(ShapeError, match="dispatcher='flex'"):
        MoEShape(dispatcher="flex").check(1)
    with pytest.raises(ShapeError, match="moe_router_topk=5"):
        MoEShape(moe_router_topk=5).check(1)


def test_tp_without_sequence_parallelism_is_refused():
    from harness.families.moe.model import build_moe_gpt

    with pytest.raises(ShapeError, match="sequence parallelism"):
        build_moe_gpt(MoEShape(), tp=2, sequence_parallel=False)


# ------------------------------------------------------------- world size 1


def test_world_size_one_routes_to_every_expert_and_kinds_agree():
    ref = _reference(dispatcher="allgather", grouped=False)
    assert ref["experts_type"] == ["SequentialMLP"] and ref["dispatcher"] == ["MoEAllGatherTokenDispatcher"]
    assert len(ref["counts"]) == 2  # one router per layer
    shape = MoEShape()
    tokens = shape.seq_length * shape.micro_batch_size
    for layer, counts in ref["counts"].items():
        assert counts.shape == (shape.num_experts,)
        assert int(counts.sum()) == tokens * shape.moe_router_topk, layer
        assert int(counts.min()) > 0, f"{layer}: an expert gets no token ({counts.tolist()}); equality would be vacuous"
    for kw, experts, dispatcher in [
        (dict(dispatcher="allgather", grouped=True), "TEGroupedMLP", "MoEAllGatherTokenDispatcher"),
        (dict(dispatcher="alltoall", grouped=False), "SequentialMLP", "MoEAlltoAllTokenDispatcher"),
        (dict(dispatcher="alltoall", grouped=True), "TEGroupedMLP", "MoEAlltoAllTokenDispatcher"),
    ]:
        other = _reference(**kw)
        assert other["experts_type"] == [experts] and other["dispatcher"] == [dispatcher]
        _close(other["logits"], ref["logits"], f"{kw} logits vs sequential/allgather", 1e-12)
        _close(other["input_grad"], ref["input_grad"], f"{kw} input grad", 1e-12)
        # Same full weights whatever the expert kind: the same gradient names and values.
        assert sorted(other["grads"]) == sorted(ref["grads"])
        for name, (_kind, _part, g) in ref["grads"].items():
            _close(other["grads"][name][2], g, f"{kw} grad {name}", 1e-12)
    # Routed-expert grads are keyed by global expert index: layers x experts x (fc1, fc2).
    expert_keys = sorted(n for n, (kind, _, _) in ref["grads"].items() if kind == "expert")
    assert len(expert_keys) == shape.num_layers * shape.num_experts * 2, expert_keys
    assert "decoder.layers.1.mlp.experts.3.linear_fc2.weight" in expert_keys


# ----------------------------------------------------------------- layouts


def _check_layout(ref, ranks, layout_name, tol=TOL):
    from harness.layouts import ParallelLayout

    layout = ParallelLayout.parse(layout_name)
    world = len(ranks)
    tp = layout.tp
    replica = [r for r in ranks if r["rank"] < tp]  # dense DP replica 0: TP ranks 0..tp-1
    assert [r["tp_rank"] for r in replica] == list(range(tp))
    for r in ranks:
        assert (r["tp_size"], r["ep_size"], r["etp_size"]) == (tp, layout.ep, layout.etp_size)
        _close(r["logits"], ref["logits"], f"{layout_name} logits on rank {r['rank']}", tol)
    # Input gradient: each TP rank holds its sequence shard under SP.
    dx = torch.cat([r["input_grad"] for r in replica], dim=0) if layout.sp else replica[0]["input_grad"]
    _close(dx, ref["input_grad"], f"{layout_name} input grad", tol)
    # Routing: the same tokens go to the same experts.
    for layer, counts in ref["counts"].items():
        got = sum(r["counts"][layer] for r in replica)
        assert torch.equal(got, counts), f"{layout_name} {layer}: routed {got.tolist()} vs {counts.tolist()} at world 1"
    # Gradients.
    copies = world // tp  # how many ranks hold each token (identical DP replicas)
    seen = set()
    for name, (kind, _part, full) in ref["grads"].items():
        if kind == "expert":
            # Sum over the ranks holding the same ETP shard, unshard over ETP, undo the replication.
            by_etp: dict[int, torch.Tensor] = {}
            for r in ranks:
                if name in r["grads"]:
                    g = r["grads"][name][2]
                    by_etp[r["etp_rank"]] = by_etp.get(r["etp_rank"], 0) + g
                    part = r["grads"][name][1]
            assert sorted(by_etp) == list(range(layout.etp_size)), f"{layout_name}: {name} held by ETP ranks {sorted(by_etp)}"
            got = unshard([by_etp[i] for i in range(layout.etp_size)], part) / copies
        else:
            pieces = [r["grads"][name] for r in replica]
            kinds = {p[0] for p in pieces}
            assert len(kinds) == 1, name
            k, part = pieces[0][0], pieces[0][1]
            if k == "sp":
                got = sum(p[2] for p in pieces)
            elif part.dim is None:
                for r in ranks:
                    _close(r["grads"][name][2], full, f"{layout_name} replicated grad {name} on rank {r['rank']}", tol)
                got = pieces[0][2]
            else:
                got = unshard([p[2] for p in pieces], part)
        assert full.abs().max() > 0, name
        _close(got, full, f"{layout_name} grad {name}", tol)
        seen.add(name)
    held = set().union(*(r["grads"] for r in ranks))
    assert held == seen, f"{layout_name}: grads not at world 1: {sorted(held - seen)}"


LAYOUTS_2 = ["tp1-ep2", "tp2-sp", "tp2-ep1-etp1-sp"]
LAYOUTS_4 = ["tp2-ep2-etp1-sp", "tp2-ep2-sp", "tp1-ep4", "tp1-ep2-etp2"]
KINDS = [
    pytest.param("allgather", False, id="allgather-sequential"),
    pytest.param("allgather", True, id="allgather-grouped"),
    pytest.param("alltoall", False, id="alltoall-sequential"),
    pytest.param("alltoall", True, id="alltoall-grouped"),
]


@pytest.mark.parametrize("dispatcher,grouped", KINDS)
def test_two_rank_layouts_equal_world_size_one(dispatcher, grouped):
    kw = dict(dispatcher=dispatcher, grouped=grouped)
    ref = _reference(**kw)
    for layout in LAYOUTS_2:
        ranks = _run(2, layout, **kw)
        _check_layout(ref, ranks, layout)


@pytest.mark.nightly
@pytest.mark.xdist_group(name="lora-world4")  # 4-rank worlds run one at a time (2 cores)
@pytest.mark.parametrize("dispatcher,grouped", KINDS)
def test_four_rank_layouts_equal_world_size_one(dispatcher, grouped):
    kw = dict(dispatcher=dispatcher, grouped=grouped)
    ref = _reference(**kw)
    # The allgather dispatcher has no uneven-split path: two layouts (ETP=1 and ETP=2 with EP=2) cover it.
    layouts = LAYOUTS_4 if dispatcher == "alltoall" else ["tp2-ep2-etp1-sp", "tp1-ep2-etp2"]
    for layout in layouts:
        ranks = _run(4, layout, **kw)
        _check_layout(ref, ranks, layout)


@pytest.mark.nightly
@pytest.mark.xdist_group(name="lora-world4")  # 4-rank worlds run one at a time (2 cores)
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_shared_experts_equal_world_size_one(dispatcher):
    kw = dict(dispatcher=dispatcher, grouped=True, shared_expert_ffn_hidden_size=32)
    ref = _reference(**kw)
    assert any("shared_experts.linear_fc1" in n for n in ref["grads"])
    _check_layout(ref, _run(2, "tp1-ep2", **kw), "tp1-ep2")
    _check_layout(ref, _run(4, "tp2-ep2-sp", **kw), "tp2-ep2-sp")
    # The shared expert really contributes.
    plain = _reference(dispatcher=dispatcher, grouped=True)
    assert not torch.allclose(plain["logits"], ref["logits"], rtol=1e-3, atol=1e-3)


def test_float32_routes_the_same_and_agrees():
    # The harness's default dtype: routing must not flip between layouts on rounding.
    kw = dict(dispatcher="alltoall", grouped=True)
    ref = _reference(torch.float32, **kw)
    assert ref["logits"].dtype == torch.float32
    _check_layout(ref, _run(4, "tp2-ep2-sp", torch.float32, **kw), "tp2-ep2-sp", tol=1e-4)


def test_a_wrong_expert_placement_is_caught():
    # Loading expert e at EP rank r as if it were local index i (no ep offset)
    # must break equality: the layout check is not vacuous for EP.
    kw = dict(dispatcher="alltoall", grouped=False)
    ref = _reference(**kw)
    ranks = pool(2).run(tasks.moe_forward_backward, SEED, "tp1-ep2", kw, torch.float64, (), True, timeout=TASK_TIMEOUT_S)
    assert ranks[0]["error"] is None
    with pytest.raises(AssertionError, match="logits"):
        _check_layout(ref, ranks, "tp1-ep2")


# ------------------------------------------------------ the CPU overrides


def test_overrides_are_scoped_and_suspendable():
    import importlib

    from harness import cpu

    with cpu.cpu_mode():
        for mod_name, fn_name in cpu.MOE_OVERRIDES:
            module = importlib.import_module(mod_name)
            override = module.__dict__[fn_name]
            assert override.__module__ == "harness.cpu", (mod_name, fn_name)
            restore = cpu.suspend_override(mod_name, fn_name)
            assert module.__dict__[fn_name].__module__.startswith("megatron."), (mod_name, fn_name)
            restore()
            assert module.__dict__[fn_name] is override
        # moe_utils' own function (other callers) is untouched.
        from megatron.core.transformer.moe import moe_utils

        assert moe_utils.maybe_move_tensor_to_cpu.__module__ == "megatron.core.transformer.moe.moe_utils"


def test_cpu_split_sizes_become_host_arrays():
    import numpy as np

    from harness.cpu import _cpu_maybe_move_tensor_to_cpu

    t = torch.tensor([3, 5])
    out = _cpu_maybe_move_tensor_to_cpu(t, as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 5]
    assert _cpu_maybe_move_tensor_to_cpu(t) is not None and torch.equal(_cpu_maybe_move_tensor_to_cpu(t), t)
    assert _cpu_maybe_move_tensor_to_cpu(None, as_numpy=True) is None


def test_alltoall_dispatcher_needs_the_split_size_override():
    from harness.cpu import MOE_OVERRIDES

    kw = dict(dispatcher="alltoall", grouped=False)
    split_fix = (MOE_OVERRIDES[0],)
    ranks = pool(2).run(tasks.moe_forward_backward, SEED, "tp1-ep2", kw, torch.float64, split_fix, timeout=TASK_TIMEOUT_S)
    for r in ranks:
        err = r["error"]
        assert err is not None, "the alltoall dispatcher ran at EP=2 without the split-size override"
        assert err["type"] == "TypeError" and "all_to_all_single" in err["message"], err["message"][:300]
    # ...and with it (the override restored on the same pool) it runs and is right.
    _check_layout(_reference(**kw), _run(2, "tp1-ep2", **kw), "tp1-ep2")


@pytest.mark.xdist_group(name="lora-world4")  # 4-rank worlds run one at a time (2 cores)
def test_alltoall_dispatcher_with_etp_needs_the_uneven_gather_override():
    from harness.cpu import MOE_OVERRIDES

    kw = dict(dispatcher="alltoall", grouped=True)
    gather_fix = (MOE_OVERRIDES[1],)
    ranks = pool(4).run(tasks.moe_forward_backward, SEED, "tp2-ep2-sp", kw, torch.float64, gather_fix, timeout=TASK_TIMEOUT_S)
    errors = [r["error"] for r in ranks]
    assert all(e is not None for e in errors), "uneven expert-TP gather ran on gloo without the override"
    assert any("invalid tensor size" in e["message"] for e in errors), [e["message"][:200] for e in errors]
    _check_layout(_reference(**kw), _run(4, "tp2-ep2-sp", **kw), "tp2-ep2-sp")
