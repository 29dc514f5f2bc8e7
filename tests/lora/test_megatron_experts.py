"""lora.megatron on routed experts (SPEC "Experts (MoE)"): every layout equals world size 1, in float64.

Real megatron-core MoE GPTs (harness.families.moe.model) on CPU with gloo, SequentialMLP
and grouped experts, allgather and alltoall dispatchers, shared and
per-expert grouped adapters, some with shared experts (dense adapters under
sequence parallelism). lora.megatron.LoRA(target_modules=[fc1, fc2], dim=4)
is applied, every adapter is set to slices of seeded FULL matrices named by
the GLOBAL expert index, and one forward/backward is compared with
lora.megatron at world size 1:

* logits on every rank, the (sequence-gathered) input gradient;
* per-expert adapter gradients: summed over the ranks holding the same ETP
  shard, unsharded over ETP (SPEC partition), divided by the number of
  identical dense-DP replicas (every replica is fed the same full batch);
* shared grouped adapters: after the EP gradient sum every rank holds its
  ETP shard of world-1's gradient times the number of DP replicas per
  expert-parallel block (explained at ``_check_shared``);
* dense (shared-expert) adapters: dense-DP replica 0, unsharded over TP;
* the initial adapters (B drawn "normal") reassembled from the ranks equal
  world-1's, and torch's generator ends in world-1's state (global expert
  draw order, SequentialMLP replay);
* applying LoRA twice changes nothing; merge_lora's forward equals the
  adapted one;
* two known-wrong ETP steps (a row adapter gathered to full width on every
  ETP rank; no copy-to-region all-reduce after A) are caught.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from harness.layouts import ParallelLayout  # noqa: E402
from harness.sharding import unshard  # noqa: E402
from tests.helpers import expert_tasks as tasks  # noqa: E402

POOL_KW = dict(
    initializer="harness.cpu:rank_initializer",
    preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
)
SEED = 13
TOL = 1e-9
TASK_TIMEOUT_S = 240  # a hang guard on a loaded 2-core machine, not a speed target

CASES = {
    "allgather-sequential": dict(dispatcher="allgather", grouped=False),
    "alltoall-sequential-shexp": dict(dispatcher="alltoall", grouped=False, shared_expert=32),
    "allgather-grouped-shared": dict(dispatcher="allgather", grouped=True, share=True),
    "alltoall-grouped-shared-shexp": dict(dispatcher="alltoall", grouped=True, share=True, shared_expert=32),
    "allgather-grouped-per-expert": dict(dispatcher="allgather", grouped=True, share=False),
    "alltoall-grouped-per-expert": dict(dispatcher="alltoall", grouped=True, share=False),
}


def _cases(ids):
    return [dict(CASES[i], id=i) for i in ids]


def pool(world_size: int):
    from harness.pool import get_pool

    return get_pool(world_size, "gloo", **POOL_KW)


def _close(actual, expected, what, tol=TOL):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _run(world_size, layout, ids, **kw):
    ranks = pool(world_size).run(tasks.expert_lora_run, SEED, layout, _cases(ids), timeout=TASK_TIMEOUT_S, **kw)
    for r in ranks:
        for cid, res in r["cases"].items():
            assert res["error"] is None, f"{layout} {cid} rank {r['rank']}: {res['error']['type']}: {res['error']['message'][:800]}"
    return ranks


_REF: dict = {}


def _reference(ids):
    missing = [i for i in ids if i not in _REF]
    if missing:
        (r,) = _run(1, "tp1", missing, merge=True)
        _REF.update(r["cases"])
    return {i: _REF[i] for i in ids}


# ------------------------------------------------------------------ checks


def _gather_expert(ranks, cid, name_key, field, copies):
    """A per-expert adapter matrix from all ranks: sum over ranks with the same ETP shard, unshard, / copies."""
    by_etp, part = {}, None
    for r in ranks:
        for p in r["cases"][cid]["params"].values():
            if p["key"] == name_key:
                by_etp[p["rank"]] = by_etp.get(p["rank"], 0) + p[field]
                part = p["part"]
    assert sorted(by_etp) == list(range(ranks[0]["etp_size"])), f"{name_key} held by ETP ranks {sorted(by_etp)}"
    return unshard([by_etp[i] for i in range(len(by_etp))], part) / copies


def _ref_by_key(ref):
    return {p["key"]: p for p in ref["params"].values()}


def _check_shared(ranks, cid, key, ref_grad, layout, world):
    """A shared grouped adapter's gradient after the EP sum.

    The dispatcher gathers tokens over ETP (alltoall: after the EP
    all-to-all; allgather: over ETP x EP), so one expert-parallel block (its
    ETP x EP ranks) computes, summed over its EP ranks by our hook, the
    gradient of every token its ranks hold, each ETP rank its exact shard
    (the copy-to-region completes dL/dh). Each dense-DP replica holds the
    full batch (tp ranks), so a block of etp*ep ranks holds etp*ep/tp whole
    replicas = (world/tp)/edp when tp divides etp*ep: every rank's gradient
    is its shard of world-1's times (world/tp)/edp. (Megatron's DDP would
    then sum it over EDP: world/tp times world-1's, like every expert param.)
    """
    tp, edp = layout.tp, ranks[0]["cases"][cid]["edp_size"]
    whole_replicas = (layout.etp_size * layout.ep) % tp == 0
    factor = (world / tp) / edp
    blocks: dict[int, dict[int, list]] = {}
    part = None
    for r in ranks:
        res = r["cases"][cid]
        for p in res["params"].values():
            if p["key"] == key:
                blocks.setdefault(res["edp_rank"], {}).setdefault(p["rank"], []).append((r["rank"], p["grad"], p["init"]))
                part = p["part"]
    assert len(blocks) == edp
    for b, by_etp in blocks.items():
        assert sorted(by_etp) == list(range(layout.etp_size))
        for k, held in by_etp.items():
            assert len(held) == layout.ep, (key, b, k, len(held))
            for rank, g, init in held[1:]:
                # EP ranks of a block: the same shard, bitwise (broadcast at creation, EP-summed grads).
                assert torch.equal(init, held[0][2]), f"{key}: shared adapter differs on EP rank (global rank {rank})"
                assert torch.equal(g, held[0][1]), f"{key}: shared adapter grad differs on global rank {rank}"
        got = unshard([by_etp[k][0][1] for k in range(layout.etp_size)], part)
        if whole_replicas:
            _close(got, ref_grad * factor, f"{layout.describe()} {cid} shared grad {key} (block {b}, x{factor})")
        blocks[b] = got
    # A block holding part of a replica (e.g. tp2-ep1-etp1: one TP rank's
    # sequence shard) has part of the gradient; the sum over blocks (what
    # DDP's EDP reduction forms) is world/tp times world-1's in any case.
    total = sum(blocks.values())
    _close(total / (world / tp), ref_grad, f"{layout.describe()} {cid} shared grad {key} summed over EDP")


def _check(ref_cases, ranks, layout_name, ids, tol=TOL):
    layout = ParallelLayout.parse(layout_name)
    world, tp = len(ranks), layout.tp
    copies = world // tp
    replica = [r for r in ranks if r["rank"] < tp]
    assert [r["tp_rank"] for r in replica] == list(range(tp))
    for cid in ids:
        ref = ref_cases[cid]
        what = f"{layout_name} {cid}"
        for r in ranks:
            res = r["cases"][cid]
            _close(res["logits"], ref["logits"], f"{what} logits on rank {r['rank']}", tol)
            assert torch.equal(res["rng_after"], ref["rng_after"]), f"{what}: RNG after LoRA differs from world 1 on rank {r['rank']}"
            assert res["idempotent"], f"{what}: a second LoRA call changed the model or drew numbers (rank {r['rank']})"
            assert res["base_grads"] == [], f"{what}: base params got grads: {res['base_grads'][:5]}"
        dx = torch.cat([r["cases"][cid]["input_grad"] for r in replica], dim=0) if layout.sp else replica[0]["cases"][cid]["input_grad"]
        _close(dx, ref["input_grad"], f"{what} input grad", tol)
        refp = _ref_by_key(ref)
        seen = set()
        for key, rp in refp.items():
            kind = rp["kind"]
            if kind == "expert":
                got_init = _gather_expert(ranks, cid, key, "init", 1) / _count_holders(ranks, cid, key)
                got = _gather_expert(ranks, cid, key, "grad", copies)
            elif kind == "shared":
                _check_shared(ranks, cid, key, rp["grad"], layout, world)
                pieces = {}
                for r in ranks:
                    for p in r["cases"][cid]["params"].values():
                        if p["key"] == key:
                            pieces[p["rank"]] = p
                got_init = unshard([pieces[k]["init"] for k in sorted(pieces)], rp["part"])
                got = None
            else:
                pieces = [next(p for p in r["cases"][cid]["params"].values() if p["key"] == key) for r in replica]
                got_init = unshard([p["init"] for p in pieces], pieces[0]["part"])
                got = unshard([p["grad"] for p in pieces], pieces[0]["part"])
            _close(got_init, rp["init"], f"{what} initial {key}", 0)
            assert rp["grad"].abs().max() > 0, f"{what}: world-1 grad of {key} is zero (vacuous)"
            if got is not None:
                _close(got, rp["grad"], f"{what} grad {key}", tol)
            seen.add(key)
        held = {p["key"] for r in ranks for p in r["cases"][cid]["params"].values()}
        assert held == seen, f"{what}: adapter keys not at world 1: {sorted(held ^ seen)}"
        if "merge" in ranks[0]["cases"][cid]:
            for r in ranks:
                m = r["cases"][cid]["merge"]
                assert m["wrappers_left"] == []
                _close(m["merged"], m["adapted"], f"{what} merged vs adapted logits on rank {r['rank']}", 1e-10)


def _count_holders(ranks, cid, key):
    """How many ranks hold each ETP shard of a per-expert adapter (the init is replicated, not summed)."""
    counts = {}
    for r in ranks:
        for p in r["cases"][cid]["params"].values():
            if p["key"] == key:
                counts[p["rank"]] = counts.get(p["rank"], 0) + 1
    (n,) = set(counts.values())
    return n


# ------------------------------------------------------------------- tests


def test_world_size_one_kinds_agree():
    # Same full weights and the same full adapters (keyed by global expert):
    # SequentialMLP and per-expert grouped adapters compute the same model.
    ref = _reference(list(CASES))
    seq, grp = ref["allgather-sequential"], ref["allgather-grouped-per-expert"]
    assert seq["wrapper_types"] == ["ExpertLoRALinear"] and grp["wrapper_types"] == ["GroupedLoRALinear"]
    _close(grp["logits"], seq["logits"], "grouped per-expert vs sequential logits", 1e-12)
    gseq, ggrp = _ref_by_key(seq), _ref_by_key(grp)
    assert sorted(gseq) == sorted(ggrp)
    for key in gseq:
        _close(ggrp[key]["grad"], gseq[key]["grad"], f"grad {key}", 1e-12)
    # Shared experts are dense linears with the dense TP adapter.
    shexp = ref["alltoall-grouped-shared-shexp"]
    assert shexp["wrapper_types"] == ["GroupedLoRALinear", "ParallelLoRALinear"], shexp["wrapper_types"]
    assert any(".shared_experts." in n for n in shexp["params"])
    for cid, r in ref.items():
        assert r["idempotent"], cid
        _close(r["merge"]["merged"], r["merge"]["adapted"], f"{cid} merged vs adapted", 1e-10)


def test_two_rank_layouts_equal_world_size_one():
    ids = list(CASES)
    ref = _reference(ids)
    for layout in ("tp1-ep2", "tp2-sp"):
        _check(ref, _run(2, layout, ids), layout, ids)
    # ETP=1 and EP=1 under TP=2: no explicit expert comm, each TP rank routes its own sequence shard.
    ids = ["allgather-sequential", "alltoall-grouped-shared-shexp"]
    _check(ref, _run(2, "tp2-ep1-etp1-sp", ids), "tp2-ep1-etp1-sp", ids)


FOUR_RANK = {
    # tp2-ep2-sp: ETP=2 and EP=2 at once; every kind, merge checked.
    "tp2-ep2-sp": list(CASES),
    # ETP=1 under TP=2 (the expert adapters must not use the dense TP group).
    "tp2-ep2-etp1-sp": ["alltoall-sequential-shexp", "allgather-grouped-shared", "alltoall-grouped-per-expert"],
    # EP=2 with two expert-data-parallel blocks.
    "tp1-ep2": ["allgather-sequential", "alltoall-grouped-shared-shexp"],
}


@pytest.mark.nightly
@pytest.mark.xdist_group(name="lora-world4")  # 4-rank worlds run one at a time (2 cores)
@pytest.mark.parametrize("layout_name", list(FOUR_RANK))
def test_four_rank_layouts_equal_world_size_one(layout_name):
    ids = FOUR_RANK[layout_name]
    ref = _reference(ids)
    _check(ref, _run(4, layout_name, ids, merge=layout_name == "tp2-ep2-sp"), layout_name, ids)


@pytest.mark.nightly
@pytest.mark.xdist_group(name="lora-world4")  # 4-rank worlds run one at a time (2 cores)
@pytest.mark.parametrize(
    "how,cid,match",
    [
        # B's output gathered to full width on both ETP ranks: the dispatcher's ETP sum doubles the delta.
        ("row_full_width", "alltoall-sequential-shexp", "logits"),
        # No copy-to-region all-reduce: logits stay right, the gradients through A (input, A) are wrong.
        ("no_copy_allreduce", "allgather-grouped-per-expert", "grad"),
    ],
)
def test_known_wrong_etp_steps_are_caught(how, cid, match):
    ids = [cid]
    ref = _reference(ids)
    ranks = _run(4, "tp2-ep2-sp", ids, break_how=how)
    if how == "no_copy_allreduce":
        # The forward stays exact. In the last layer's fc2, B's gradients stay
        # exact too (h and dL/dout are right) while A's miss the other ETP
        # rank's terms (and so does everything upstream of them).
        for r in ranks:
            _close(r["cases"][cid]["logits"], ref[cid]["logits"], f"{how}: forward stays exact")
        last_fc2 = {k: p for k, p in _ref_by_key(ref[cid]).items() if k.startswith("decoder.layers.1.") and ".linear_fc2." in k}
        assert len(last_fc2) == 2 * 4  # A and B of 4 experts
        for key, rp in last_fc2.items():
            got = _gather_expert(ranks, cid, key, "grad", 2)
            if key.endswith("linear_out"):
                _close(got, rp["grad"], f"{how}: B grad {key}")
            else:
                assert not torch.allclose(got, rp["grad"], rtol=1e-6, atol=1e-6), f"{how}: A grad {key} right"
    with pytest.raises(AssertionError, match=match):
        _check(ref, ranks, "tp2-ep2-sp", ids)


def test_sequential_init_without_global_order_is_caught():
    # Without the replay, EP rank 1 draws its local experts as global experts 0..L-1.
    ids = ["allgather-sequential"]
    ref = _reference(ids)
    ranks = _run(2, "tp1-ep2", ids, break_how="no_init_replay")
    with pytest.raises(AssertionError, match="RNG after LoRA|initial"):
        _check(ref, ranks, "tp1-ep2", ids)


def test_normalize_moe_lora_etp_divisibility_and_inference():
    ranks = pool(2).run(tasks.expert_lora_misc, SEED, "tp2-sp", timeout=TASK_TIMEOUT_S)
    for r in ranks:
        assert r["etp_size"] == 2
        for k in ("sequential", "grouped"):
            shapes = r[f"{k}_normalized_shapes"]
            expert = {n: s for n, s in shapes.items() if ".mlp.experts." in n}
            dense = {n: s for n, s in shapes.items() if ".shared_experts." in n}
            assert expert and dense
            # dim 4 // topk 2 = 2, split over ETP=2 for A of fc1 (column base)
            for n, s in expert.items():
                r_dim = s[0] if ".linear_in." in n else s[1]
                assert r_dim == (1 if ".linear_fc1.adapter.linear_in." in n else 2), (n, s)
            for n, s in dense.items():
                r_dim = s[0] if ".linear_in." in n else s[1]
                assert r_dim == (2 if ".linear_fc1.adapter.linear_in." in n else 4), (n, s)
            inf = r[f"{k}_inference"]
            assert inf["adapters"] > 0 and not inf["any_trainable"] and not inf["any_training"], inf
            err = r[f"{k}_errors"]["dim_not_divisible_by_etp"]
            assert err is not None and err["type"] == "ValueError", err
            assert "dim=3" in err["message"] and "ETP=2" in err["message"] and "linear_fc1" in err["message"], err
            assert "experts" in err["message"], err
            err = r[f"{k}_errors"]["dim_not_divisible_by_topk"]
            assert err is not None and err["type"] == "ValueError" and "topk=2" in err["message"], err
            ld = r[f"{k}_lora_dtype"]
            assert ld == {"adapter_dtypes": ["torch.bfloat16"], "logits_dtype": "torch.float64", "finite": True}, ld
        assert set(r["topk_found"].values()) == {2}, r["topk_found"]


def test_walk_leave_hook_runs_after_the_subtree():
    from torch import nn

    from lora.megatron.walk import walk_and_replace

    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    events = []

    def visit(module, name, prefix):
        events.append(("enter", f"{prefix}.{name}".strip(".")))
        return module, True

    def leave(module, name, prefix):
        events.append(("leave", f"{prefix}.{name}".strip(".")))

    walk_and_replace(model, visit, leave)
    assert events == [
        ("enter", ""), ("enter", "0"), ("enter", "0.0"), ("leave", "0.0"), ("enter", "0.1"), ("leave", "0.1"),
        ("leave", "0"), ("enter", "1"), ("leave", "1"), ("leave", ""),
    ]


def test_grouped_linears_are_linear_type_and_wrappers_are_not():
    # Exclude mode adapts every linear-type module: grouped expert linears
    # (duck-typed, as in lora.reference) included, an adapter wrapper not.
    from torch import nn

    from lora.megatron.matching import is_linear_type
    from lora.megatron.expert_adapters import GroupedLoRALinear, is_grouped_linear

    class Grouped(nn.Module):
        num_gemms = 2

        def __init__(self):
            super().__init__()
            self.weight0 = nn.Parameter(torch.zeros(3, 2))
            self.weight1 = nn.Parameter(torch.zeros(3, 2))

    g = Grouped()
    assert is_grouped_linear(g) and is_linear_type(g)
    w = GroupedLoRALinear(g, nn.Module())
    assert w.num_gemms == 2 and not is_grouped_linear(w)
    del g.weight1
    assert not is_grouped_linear(g)


def test_capabilities_declare_experts():
    import lora.megatron

    assert lora.megatron.LORA_HARNESS_CAPABILITIES["experts"] is True
