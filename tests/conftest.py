"""Project test settings: tests marked ``nightly`` run under ``--hypothesis-profile deep``, or when named.

They re-check, with hand-built layouts or slower end-to-end launches, what
the properties already check at every layout on every CI run (lora.megatron's
experts and megatron's MoE layers against world size 1, eight-rank worlds,
torchrun faults beyond a raising rank); CI's ten minutes go to the
properties and to the tests that feed them wrong implementations. Naming a
test file or test on the command line (``pytest tests/pool/test_torchrun.py``)
runs its nightly tests too: a file asked for by name is run whole.
"""

from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "nightly: runs under --hypothesis-profile deep (nightly), or when its file is named")


def _named(config) -> set[Path]:
    """Test files named on the command line (a directory names nothing in particular)."""
    named = set()
    for arg in config.args:
        path = Path(str(arg).split("::", 1)[0])
        if path.suffix == ".py":
            named.add(path.resolve())
    return named


# The longest single tests (each a subprocess that runs pytest, the CLI or
# torchrun end to end): started first, so that the two workers of
# ``pytest -n auto`` on two cores do not end with one of them alone on one.
LONGEST_FIRST = ("tests/frontends/test_downstream.py", "tests/pool/test_torchrun.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable: the rest keep their order
    if (config.getoption("hypothesis_profile", default=None) or "") == "deep":
        return
    named = _named(config)
    skip = pytest.mark.skip(reason="nightly: its checks run on every CI run through the properties; "
                                   "runs under --hypothesis-profile deep or when its file is named")
    for item in items:
        if item.get_closest_marker("nightly") and Path(str(item.fspath)).resolve() not in named:
            item.add_marker(skip)
