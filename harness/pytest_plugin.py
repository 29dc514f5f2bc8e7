"""pytest plugin (entry point ``pytest11``): layout options, fixtures, rank-pool cleanup.

Options:

* ``--tp N`` / ``--ep M``: the largest tensor / expert parallel sizes to
  check; a test that takes a ``layout`` argument is run at every layout of
  ``harness.settings.layout_set(N, M)`` (ids like ``tp2-ep1-etp2-pp1``);
* ``--lora-impl MODULE``: the implementation under test (default
  ``lora.megatron``); any importable module exposing ``LoRA``, ``VLMLoRA``,
  ``LoRAMerge`` with SPEC.md's interface and parameter names;
* ``--rank-timeout SECONDS``: ceiling for one rank task (default: the
  runner's policy, see ``harness.runner``).

Without ``--hypothesis-profile`` the ``fast`` profile is loaded; ``deep`` is
the nightly one. Rank pools are shut down when the session ends, so no rank
process outlives the run.
"""

from __future__ import annotations

import os

import pytest

from harness.settings import DEFAULT_PROFILE, layout_set, register_profiles


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora-harness", "LoRA sharding harness")
    group.addoption("--tp", type=int, default=2, help="largest tensor-parallel size to check (default 2)")
    group.addoption("--ep", type=int, default=1, help="largest expert-parallel size to check (default 1)")
    group.addoption(
        "--lora-impl",
        default="lora.megatron",
        help="module under test exposing LoRA, VLMLoRA, LoRAMerge (default lora.megatron)",
    )
    group.addoption("--rank-timeout", type=float, default=None, help="ceiling in seconds for one rank task")


def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    register_profiles()
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile(DEFAULT_PROFILE)
    timeout = config.getoption("rank_timeout")
    if timeout:
        os.environ["LORA_HARNESS_RANK_TIMEOUT"] = str(timeout)
    config.addinivalue_line("markers", "layouts: the test is parametrized over the --tp/--ep layout set")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "layout" in metafunc.fixturenames:
        layouts = layout_set(metafunc.config.getoption("tp"), metafunc.config.getoption("ep"))
        metafunc.parametrize("layout", layouts, ids=[l.describe() for l in layouts])


@pytest.fixture(scope="session")
def lora_impl(request: pytest.FixtureRequest) -> str:
    """Name of the implementation under test, checked to expose the SPEC names."""
    from harness.tasks import load_impl

    name = request.config.getoption("lora_impl")
    load_impl(name)
    return name


@pytest.fixture(scope="session")
def max_tp(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("tp")


@pytest.fixture(scope="session")
def max_ep(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("ep")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from harness.runner import shutdown_all

    shutdown_all()
