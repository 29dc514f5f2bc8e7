"""The properties themselves, for the implementation under test (``--lora-impl``), at every layout of ``--tp``."""

import pytest

from harness.properties import PROPERTIES, require_property


@pytest.mark.parametrize("prop", sorted(PROPERTIES))
def test_property_holds(prop, layout, lora_impl):
    outcome = require_property(prop, layout, lora_impl)
    assert outcome.passed
    assert outcome.examples > 0
