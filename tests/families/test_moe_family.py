"""The MoE case family: its cases, layouts, draws and parent-side validation.

The properties themselves run through the plugin (tests/properties/test_properties.py
parametrizes every family); here: what makes those runs meaningful (routing
that reaches every expert, layouts with ETP != TP and expert data
parallelism) and bad configurations refused before any rank starts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.cases import CaseError, case_from_json
from harness.families.moe.case import MoECase
from harness.layouts import LayoutError, ParallelLayout
from harness.families.moe.model import MoEShape
from harness.settings import layout_set
from harness.families.moe.strategy import moe_cases


def _case(**kw):
    base = dict(shape=MoEShape(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2),
                lora=dict(target_modules=["linear_fc1", "linear_fc2"], dim=4), seed=3, model_dtype=torch.float64)
    base.update(kw)
    return MoECase(**base)


def test_moe_layout_set_has_etp_other_than_tp_and_expert_data_parallelism():
    layouts = {str(l): l for l in layout_set(2, 2, "moe")}
    assert set(layouts) == {
        "tp1-ep1-etp1-pp1", "tp1-ep2-etp1-pp1", "tp2-ep1-etp1-pp1-sp", "tp2-ep1-etp2-pp1-sp",
        "tp2-ep2-etp1-pp1-sp", "tp2-ep2-etp1-pp1-dp2-sp", "tp2-ep2-etp2-pp1-sp",
    }
    big = layouts["tp2-ep2-etp1-pp1-dp2-sp"]
    assert big.min_world_size == 4 and big.dp(4) == 2 and big.expert_dp(4) == 2
    assert layouts["tp2-ep2-etp2-pp1-sp"].dp(4) == 2  # dense data parallelism 2
    assert all(l.sp for l in layouts.values() if l.tp > 1), "MoE at TP > 1 needs sequence parallelism"
    assert [str(l) for l in layout_set(2, 1, "moe")] == ["tp1-ep1-etp1-pp1", "tp2-ep1-etp1-pp1-sp", "tp2-ep1-etp2-pp1-sp"]


def test_data_parallel_layouts_name_and_parse_alike():
    layout = ParallelLayout(tp=2, ep=2, etp=1, sp=True, data_parallel=2)
    assert str(layout) == "tp2-ep2-etp1-pp1-dp2-sp" and ParallelLayout.parse(str(layout)) == layout
    # The smallest data parallelism is the default layout itself.
    assert str(ParallelLayout(tp=2, ep=2, etp=1, sp=True, data_parallel=1)) == "tp2-ep2-etp1-pp1-sp"
    with pytest.raises(LayoutError, match=r"data_parallel=1 .*divisible by etp\*ep\*pp = 2\*2\*1"):
        ParallelLayout(tp=1, ep=2, etp=2, data_parallel=1)


def test_moe_cases_round_trip_through_json():
    case = _case(layout=ParallelLayout(tp=2, ep=2, etp=1, sp=True, data_parallel=2),
                 lora=dict(target_modules=["*.experts.*linear_fc1"], dim=4, share_expert_adapters=False))
    again = case_from_json(case.to_json())
    assert again == case and type(again) is MoECase and again.shape.num_experts == 4
    assert "4x top2 sequential alltoall" in case.describe()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(layout=ParallelLayout(ep=3)), r"num_experts=4 must be divisible by EP=3"),
        (dict(lora=dict(dim=5, normalize_moe_lora=True)), r"dim=5 and moe_router_topk=2"),
        (dict(layout=ParallelLayout(tp=2)), r"TP=2 without sequence parallelism"),
        (dict(shape=MoEShape(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, moe_ffn_hidden_size=6),
              layout=ParallelLayout(tp=1, ep=1, etp=4, data_parallel=4)), r"moe_ffn_hidden_size=6 must be divisible by ETP=4"),
    ],
)
def test_bad_moe_configurations_are_refused_in_the_parent(changes, message):
    """Before any rank starts: no pool exists after the refusal."""
    from harness.pool import lifecycle
    from harness.runs import Executor

    case = _case(**changes)
    before = dict(lifecycle._pools)
    with pytest.raises(CaseError, match=message):
        Executor().run(case)
    assert lifecycle._pools == before


def test_a_layout_that_does_not_fit_the_world_is_refused():
    with pytest.raises(CaseError, match=r"does not fit world_size=3"):
        _case(layout=ParallelLayout(ep=2)).validate(world_size=3)


@pytest.mark.parametrize("moe_layout", layout_set(2, 2, "moe"), ids=str)
def test_drawn_moe_cases_are_valid_for_their_layout(moe_layout):
    layout = moe_layout
    @settings(max_examples=60, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(moe_cases(layout))
    def drawn(case):
        case.validate()
        shape = case.shape
        assert shape.seq_length * shape.micro_batch_size * shape.moe_router_topk >= 5 * shape.num_experts
        assert case.lora["dim"] % layout.tp == 0 and case.lora["dim"] % layout.etp_size == 0
        if case.lora["normalize_moe_lora"]:
            assert (case.lora["dim"] // shape.moe_router_topk) % layout.etp_size == 0
        # float64 everywhere: routing ties and value-keyed dropout masks decide alike at every layout.
        assert case.model_dtype is torch.float64 and case.lora_dtype in (None, torch.float64)
        assert case.lora["dropout"] in (0.0, 0.1, 0.5)

    drawn()


def test_draws_route_tokens_to_every_expert():
    """Equivalence of expert adapters is only shown where tokens reach them: measured, not hoped.

    Every dense data-parallel replica is fed the whole batch, so an expert
    that gets a token at world size 1 gets it on its EP rank at every
    layout (both dispatchers deliver every token routed to an expert to the
    rank holding it). Counting at world size 1 therefore counts every rank.
    """
    from harness.runs import Executor

    executor = Executor()
    cases = []

    @settings(max_examples=20, database=None, suppress_health_check=list(HealthCheck), deadline=None, derandomize=True)
    @given(moe_cases(ParallelLayout(), impl="lora.reference"))
    def collect(case):
        cases.append(case)

    collect()
    full = 0
    for case in cases:
        (record,) = executor.run(case)
        per_layer = record.extras.expert_tokens
        assert len(per_layer) == case.shape.num_layers
        if all(min(counts) > 0 for counts in per_layer.values()):
            full += 1
    assert full >= 0.8 * len(cases), f"only {full} of {len(cases)} drawn MoE cases route a token to every expert"


@pytest.mark.xdist_group(name="lora-world4")
def test_every_rank_holds_tokens_for_every_local_expert_at_world_four():
    from harness.runs import Executor

    case = _case(layout=ParallelLayout(tp=2, ep=2, etp=1, sp=True, data_parallel=2))
    records = Executor().run(case)
    assert len(records) == 4
    for rec in records:
        ((layer, counts),) = rec.extras.expert_tokens.items()
        assert len(counts) == 2 and min(counts) > 0, (rec.rank, layer, counts)
