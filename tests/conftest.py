"""Project test settings: tests marked ``nightly`` run only under ``--hypothesis-profile deep``.

They re-check, with hand-built layouts, what the MoE properties already
check at every layout on every CI run (lora.megatron's experts and
megatron's MoE layers against world size 1); CI's ten minutes go to the
properties and to the tests that feed them wrong implementations.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "nightly: runs only under --hypothesis-profile deep (nightly)")


def pytest_collection_modifyitems(config, items):
    if (config.getoption("hypothesis_profile", default=None) or "") == "deep":
        return
    skip = pytest.mark.skip(reason="nightly: covered on every run by the MoE properties; runs under --hypothesis-profile deep")
    for item in items:
        if item.get_closest_marker("nightly"):
            item.add_marker(skip)
