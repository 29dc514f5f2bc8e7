"""Every registered property, for the implementation under test (``--lora-impl``), at every layout of ``--tp``/``--ep``."""

import pytest
import torch

from harness.families.gpt.case import GPTCase
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape
from harness.properties._gather import replicas
from harness.runs import Evidence, Executor

LORA_IMPL = "lora.megatron"


def test_property_holds(lora_property):
    outcome = lora_property.require()
    assert outcome.passed
    assert outcome.examples > 0


def test_megatron_initial_adapters_equal_the_references(max_tp):
    """lora.megatron draws its full adapters exactly as lora.reference does, then shards them."""
    layout = ParallelLayout(tp=min(2, max_tp))
    lora = dict(target_modules=[], exclude_modules=["linear_proj"], dim=4, alpha=8,
                lora_A_init_method="kaiming", lora_B_init_method="normal")
    case = GPTCase(shape=GPTShape(), lora=lora, seed=5, layout=layout, model_dtype=torch.float64)
    ev = Evidence(Executor(), case)
    want = ev.reference.initial_adapters
    ((_, got),) = replicas(ev.impl, layout, "initial_adapters")
    assert set(got) == set(want) and len(got) == 2 * 7  # qkv, fc1, fc2 on 2 layers + output_layer
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.xdist_group(name="lora-world4")
def test_data_parallel_replicas_are_each_compared(max_tp, max_ep):
    """--ep 2 gives a dense model data parallelism 2: each replica's gathered gradients are compared."""
    if max_tp < 2 or max_ep < 2:
        pytest.skip("needs --tp 2 --ep 2")
    layout = ParallelLayout(tp=2, ep=2)
    case = GPTCase(shape=GPTShape(num_layers=1), lora=dict(dim=2, alpha=4), seed=3, layout=layout, model_dtype=torch.float64)
    records = Evidence(Executor(), case).impl
    assert len(records) == 4 and sorted({r.dp_rank for r in records}) == [0, 1]
    groups = replicas(records, layout, "adapter_grads")
    assert len(groups) == 2
    (_, first), (_, second) = groups
    for name in first:
        assert torch.allclose(first[name], second[name], rtol=1e-9, atol=1e-12), name


def test_properties_at_a_layout_share_the_runs_of_each_example():
    """One seed per layout: every property draws the same examples, and each run is made once."""
    from hypothesis import settings

    from harness.driver import check_property
    from harness.plan import layout_seed

    layout = ParallelLayout(tp=2)
    executor = Executor()
    run = settings(max_examples=4, database=None)
    check_property("forward_matches", layout, LORA_IMPL, settings=run, executor=executor, seed=layout_seed(11, layout), designed=False)
    impl_runs = {k for k in executor._cache if k[0] == "impl"}
    assert len(impl_runs) >= 4
    check_property("backward_matches", layout, LORA_IMPL, settings=run, executor=executor, seed=layout_seed(11, layout), designed=False)
    assert {k for k in executor._cache if k[0] == "impl"} == impl_runs
