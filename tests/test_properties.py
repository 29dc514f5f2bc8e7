"""The properties themselves, for the implementation under test (``--lora-impl``), at every layout of ``--tp``."""

import pytest
import torch

from harness.properties import PROPERTIES, require_property


@pytest.mark.parametrize("prop", sorted(PROPERTIES))
def test_property_holds(prop, layout, lora_impl):
    outcome = require_property(prop, layout, lora_impl)
    assert outcome.passed
    assert outcome.examples > 0


def test_megatron_initial_adapters_equal_the_references(max_tp):
    """lora.megatron draws its full adapters exactly as lora.reference does, then shards them."""
    from harness.layouts import ParallelLayout
    from harness.models import GPTShape
    from harness.properties import Verifier, _assemble
    from harness.tasks import GPTCase

    layout = ParallelLayout(tp=min(2, max_tp))
    lora = dict(target_modules=[], exclude_modules=["linear_proj"], dim=4, alpha=8,
                lora_A_init_method="kaiming", lora_B_init_method="normal")
    case = GPTCase(shape=GPTShape(), lora=lora, seed=5, layout=layout.describe(), model_dtype="float64")
    verifier = Verifier()
    want = verifier.reference(case)["initial_adapters"]
    (replica,) = _assemble(verifier.run(case), layout, "initial_adapters")
    got = replica["tensors"]
    assert set(got) == set(want) and len(got) == 2 * 7  # qkv, fc1, fc2 on 2 layers + output_layer
    for name in want:
        assert torch.equal(got[name], want[name]), name
