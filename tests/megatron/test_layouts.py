"""Tests of harness.layouts: validity rules, names, the layout set, and rank
groups checked against megatron-core's own RankGenerator."""

from __future__ import annotations

import math
import sys
import types

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from megatron.core.parallel_state import RankGenerator

from harness import layouts as L
from harness.layouts import GROUP_KINDS, LayoutError, ParallelLayout, powers_of_two

# kind -> (generator, megatron's get_ranks token), written from
# initialize_model_parallel in megatron-core 0.19.2, independently of
# harness.layouts' own table.
MEGATRON_TOKENS = {
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "dp-cp": ("dense", "dp-cp"),
    "pp": ("dense", "pp"),
    "tp-pp": ("dense", "tp-pp"),
    "tp-cp": ("dense", "tp-cp"),
    "tp-dp": ("dense", "tp-dp"),
    "tp-dp-cp": ("dense", "tp-dp-cp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "edp": ("expert", "dp"),
    "etp-ep": ("expert", "tp-ep"),
    "etp-ep-pp": ("expert", "tp-ep-pp"),
}


def megatron_groups(tp, cp, etp, ep, pp, world):
    """Groups as initialize_model_parallel builds its two generators."""
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(
        tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp"
    )
    gens = {"dense": dense, "expert": expert}
    return {kind: gens[gen].get_ranks(token) for kind, (gen, token) in MEGATRON_TOKENS.items()}


@st.composite
def sizes_and_world(draw, max_world=64):
    """Arbitrary (not only power-of-two) sizes, pp and cp included, and a fitting world."""
    tp = draw(st.integers(1, 8))
    cp = draw(st.integers(1, 2))
    etp = draw(st.integers(1, 8))
    ep = draw(st.integers(1, 8))
    pp = draw(st.integers(1, 3))
    unit = pp * math.lcm(tp * cp, etp * ep)
    assume(unit <= max_world)  # about half of the draws fit
    world = unit * draw(st.integers(1, max_world // unit))
    return tp, cp, etp, ep, pp, world


def check_partitions(groups, world, sizes):
    for kind, gs in groups.items():
        flat = sorted(r for g in gs for r in g)
        assert flat == list(range(world)), f"{kind} groups do not partition the world: {gs}"
        assert {len(g) for g in gs} == {sizes[kind]}, f"{kind} group size"


@settings(max_examples=500, deadline=None)
@given(sizes_and_world())
def test_group_arithmetic_matches_megatron_rank_generator(case):
    tp, cp, etp, ep, pp, world = case
    ours = L._expected_groups(tp, cp, etp, ep, pp, world)
    assert set(ours) == set(GROUP_KINDS) == set(MEGATRON_TOKENS)
    assert ours == megatron_groups(tp, cp, etp, ep, pp, world)
    dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
    sizes = {
        "tp": tp, "cp": cp, "dp": dp, "dp-cp": dp * cp, "pp": pp, "tp-pp": tp * pp,
        "tp-cp": tp * cp, "tp-dp": tp * dp, "tp-dp-cp": tp * dp * cp,
        "ep": ep, "etp": etp, "edp": edp, "etp-ep": etp * ep, "etp-ep-pp": etp * ep * pp,
    }
    check_partitions(ours, world, sizes)
    # initialize_model_parallel asserts both generators agree on pp groups
    assert ours["pp"] == megatron_groups(tp, cp, etp, ep, pp, world)["pp"]


valid_layouts = st.builds(
    lambda tp, ep, etp, sp: ParallelLayout(tp=tp, ep=ep, etp=etp, sp=sp and tp > 1),
    st.integers(1, 16),
    st.integers(1, 16),
    st.none() | st.integers(1, 16),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(valid_layouts, st.integers(1, 4))
def test_layout_groups_match_megatron_and_groups_of_is_consistent(layout, k):
    world = layout.min_world_size * k
    if world > 256:
        world = layout.min_world_size
    groups = layout.expected_groups(world)
    assert groups == megatron_groups(layout.tp, 1, layout.etp_size, layout.ep, 1, world)
    for rank in range(0, world, max(1, world // 7)):
        mine = layout.groups_of(rank, world)
        assert set(mine) == set(GROUP_KINDS)
        for kind, g in mine.items():
            assert rank in g and g in groups[kind]
    assert layout.dp(world) == len(groups["dp"][0])
    assert layout.expert_dp(world) == len(groups["edp"][0])


def test_megatron_docstring_example_tp2_pp4_on_16():
    # The example in initialize_model_parallel's docstring (tp=2, pp=4, 16 ranks).
    g = L._expected_groups(tp=2, cp=1, etp=2, ep=1, pp=4, world_size=16)
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert g["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def test_groups_of_tp2_ep2_on_8_by_hand():
    got = ParallelLayout(tp=2, ep=2, sp=True).groups_of(5, 8)
    assert got["tp"] == [4, 5]
    assert got["dp"] == [1, 3, 5, 7]
    assert got["etp"] == [4, 5]
    assert got["ep"] == [5, 7]
    assert got["edp"] == [1, 5]
    assert got["etp-ep"] == [4, 5, 6, 7]
    assert got["tp-dp"] == list(range(8))


# -- validity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"tp": 0}, ["tp=0", "integers >= 1"]),
        ({"tp": 2.0}, ["tp=2.0", "integers >= 1"]),
        ({"tp": True}, ["tp=True", "integers >= 1"]),
        ({"ep": -1}, ["ep=-1", "integers >= 1"]),
        ({"etp": 0}, ["etp=0", "integers >= 1"]),
        ({"pp": 0}, ["pp=0", "integers >= 1"]),
        ({"vpp": 2}, ["vpp=2", "pp=1", "pp > 1"]),
        ({"pp": 2, "vpp": 0}, ["vpp=0", "integers >= 1"]),
        ({"sp": 1, "tp": 2}, ["sp=1", "True or False"]),
        ({"sp": True}, ["sp=True", "tp=1", "requires tp > 1"]),
    ],
)
def test_invalid_layouts_name_field_value_and_rule(kwargs, fragments):
    with pytest.raises(LayoutError) as info:
        ParallelLayout(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_power_of_two_sizes_are_valid_as_in_megatron():
    layout = ParallelLayout(tp=3, ep=5, etp=1)
    assert layout.min_world_size == 15


@pytest.mark.parametrize(
    "tp, ep, etp, expected",
    [
        (1, 1, None, 1),
        (2, 1, None, 2),
        (2, 2, None, 4),
        (2, 2, 1, 2),
        (4, 2, 1, 4),
        (1, 4, None, 4),
        (1, 1, 4, 4),
        (4, 1, 2, 4),
        (3, 2, 1, 6),
        (2, 3, 2, 6),
        (6, 4, 1, 12),
        (4, 4, 4, 16),
    ],
)
def test_min_world_size(tp, ep, etp, expected):
    layout = ParallelLayout(tp=tp, ep=ep, etp=etp)
    assert layout.min_world_size == expected
    assert layout.fits(expected) and layout.fits(3 * expected)
    assert not any(layout.fits(w) for w in range(1, expected))


def test_dp_and_expert_dp_and_unfit_world():
    layout = ParallelLayout(tp=2, ep=2, etp=1, sp=True)
    assert (layout.dp(8), layout.expert_dp(8)) == (4, 4)
    assert (ParallelLayout(tp=2, ep=2).dp(8), ParallelLayout(tp=2, ep=2).expert_dp(8)) == (4, 2)
    assert (layout.dp(2), layout.expert_dp(2)) == (1, 1)
    with pytest.raises(LayoutError, match=r"does not fit world_size=3.*multiple of 2"):
        layout.dp(3)
    with pytest.raises(LayoutError, match="does not fit world_size=6"):
        ParallelLayout(tp=2, ep=2).expected_groups(6)
    with pytest.raises(LayoutError, match="world_size=0"):
        layout.fits(0)
    with pytest.raises(LayoutError, match="rank=8"):
        layout.groups_of(8, 8)


# -- names and identity ----------------------------------------------------------


def test_describe_examples():
    assert str(ParallelLayout(tp=2, sp=True)) == "tp2-ep1-etp2-pp1-sp"
    assert ParallelLayout().describe() == "tp1-ep1-etp1-pp1"
    assert ParallelLayout(tp=4, ep=2, etp=1).describe() == "tp4-ep2-etp1-pp1"


@settings(max_examples=500, deadline=None)
@given(valid_layouts)
def test_parse_inverts_describe(layout):
    name = layout.describe()
    back = ParallelLayout.parse(name)
    assert back == layout and hash(back) == hash(layout)
    assert back.describe() == name


def test_parse_shorthand_and_errors():
    assert ParallelLayout.parse("tp2-sp") == ParallelLayout(tp=2, sp=True)
    assert ParallelLayout.parse("tp4-ep2-etp1") == ParallelLayout(tp=4, ep=2, etp=1)
    assert ParallelLayout.parse("tp2-etp2").etp is None
    for bad in ["", "ep2", "tp2-sp-ep2", "tp-2", "tp2 ep2"]:
        with pytest.raises(LayoutError, match="cannot parse layout"):
            ParallelLayout.parse(bad)
    assert ParallelLayout.parse("tp1-pp2") == ParallelLayout(pp=2)
    assert ParallelLayout.parse("tp2-pp2-vpp2-sp") == ParallelLayout(tp=2, pp=2, vpp=2, sp=True)
    with pytest.raises(LayoutError, match="vpp=2 is invalid with pp=1"):
        ParallelLayout.parse("tp1-pp1-vpp2")


def test_pipeline_layouts_name_their_virtual_stages():
    layout = ParallelLayout(tp=1, pp=2, vpp=2)
    assert layout.describe() == "tp1-ep1-etp1-pp2-vpp2"
    assert (layout.min_world_size, layout.chunks, layout.stages) == (2, 2, 4)
    assert ParallelLayout(pp=2, vpp=1) == ParallelLayout(pp=2) and ParallelLayout(pp=2, vpp=1).vpp is None
    assert ParallelLayout(pp=2, vpp=2) != ParallelLayout(pp=2)
    assert ParallelLayout(pp=2).model_parallel_config_kwargs()["virtual_pipeline_model_parallel_size"] is None
    assert ParallelLayout(tp=2, pp=2).min_world_size == 4


def test_etp_none_equals_explicit_tp():
    assert ParallelLayout(tp=2) == ParallelLayout(tp=2, etp=2)
    assert len({ParallelLayout(tp=2), ParallelLayout(tp=2, etp=2)}) == 1
    assert ParallelLayout(tp=2) != ParallelLayout(tp=2, etp=1)
    assert ParallelLayout(tp=2, etp=None).etp_size == 2


# -- the layout set --------------------------------------------------------------


def names(layouts):
    return [x.describe() for x in layouts]


#: What --tp/--ep mean per family (one enumerator: harness.settings.layout_set, which every front end uses).
_EXPECTED = {
    ("gpt", 2, 2): ["tp1-ep1-etp1-pp1", "tp1-ep2-etp1-pp1", "tp2-ep1-etp2-pp1", "tp2-ep1-etp2-pp1-sp",
                    "tp2-ep2-etp2-pp1-sp"],
    ("moe", 2, 2): ["tp1-ep1-etp1-pp1", "tp1-ep2-etp1-pp1", "tp2-ep1-etp1-pp1-sp", "tp2-ep1-etp2-pp1-sp",
                    "tp2-ep2-etp1-pp1-sp", "tp2-ep2-etp2-pp1-sp", "tp2-ep2-etp1-pp1-dp2-sp"],
    ("vlm", 2, 2): ["tp1-ep1-etp1-pp1", "tp2-ep1-etp2-pp1"],
    ("vlm", 8, 1): ["tp1-ep1-etp1-pp1", "tp4-ep1-etp4-pp1", "tp8-ep1-etp8-pp1"],
}


@pytest.mark.parametrize("family,tp,ep", sorted(_EXPECTED))
def test_layout_set_per_family(family, tp, ep):
    from harness.settings import layout_set

    got = layout_set(tp, ep, family)
    assert sorted(names(got)) == sorted(_EXPECTED[family, tp, ep])
    assert [x.sort_key for x in got] == sorted(x.sort_key for x in got)
    assert layout_set(tp, ep, family) == got  # deterministic
    if family == "moe":
        assert all(x.moe_trainable for x in got)


def test_powers_of_two_and_sizes_that_are_not_refused_never_rounded():
    from harness.settings import layout_set

    assert powers_of_two(1) == [1] and powers_of_two(4) == [1, 2, 4] and powers_of_two(6) == [1, 2, 4]
    with pytest.raises(ValueError, match="--tp 3: the layout set runs every power of two"):
        layout_set(3)
    with pytest.raises(ValueError, match="--ep 0"):
        layout_set(2, 0)
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        layout_set(2, 1, "nope")


# -- megatron-core, in process, world of one ----------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a torch.distributed group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        L.destroy_megatron()
        dist.destroy_process_group()


def test_initialize_megatron_world_of_one(world_of_one, monkeypatch):
    from megatron.core import parallel_state as ps

    layout = ParallelLayout()
    assert layout.initialize_megatron() is True
    assert ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_pipeline_model_parallel_world_size() == 1
    assert ps.get_data_parallel_world_size() == 1
    assert ps.get_expert_model_parallel_world_size() == 1
    assert ps.get_expert_tensor_parallel_world_size() == 1
    assert ps.get_expert_data_parallel_world_size() == 1
    assert L.current_megatron_groups() == layout.groups_of(0, 1)

    # same layout again: cached, the groups are not rebuilt
    tp_group = ps.get_tensor_model_parallel_group()
    assert layout.initialize_megatron(1) is False
    assert ps.get_tensor_model_parallel_group() is tp_group

    # re-initialisation behind the cache's back is noticed
    ps.destroy_model_parallel()
    assert layout.initialize_megatron() is True
    assert ps.get_tensor_model_parallel_group() is not tp_group

    # seed hook: called on every call, cached or not
    seeds = []
    monkeypatch.setitem(sys.modules, "harness.cpu", types.SimpleNamespace(seed_model_parallel=seeds.append))
    assert layout.initialize_megatron(seed=7) is False
    assert seeds == [7]
    monkeypatch.setitem(sys.modules, "harness.cpu", None)
    with pytest.raises(ImportError, match="harness.cpu.seed_model_parallel"):
        layout.initialize_megatron(seed=1)

    with pytest.raises(LayoutError, match="world_size=2 was asked for"):
        layout.initialize_megatron(2)
    with pytest.raises(LayoutError, match="does not fit world_size=1"):
        ParallelLayout(tp=2).initialize_megatron()

    L.destroy_megatron()
    assert not ps.model_parallel_is_initialized()


def test_initialize_megatron_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a torch.distributed group already exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelLayout().initialize_megatron()
