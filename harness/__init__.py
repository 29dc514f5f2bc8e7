"""lora-harness: prove a sharded LoRA computes what a single-device reference computes, at every layout.

The public surface, for a downstream repository verifying its own LoRA:

* layouts: ``ParallelLayout``, ``layout_set``;
* the run: ``Plan`` (families x layouts x properties, budgets, seed);
* model families: ``Family``, ``register_family`` (the registry: ``harness.families``);
* cases and strategies: ``GPTCase``, ``gpt_cases``, ``lora_configs``, ``cases_for``;
* the contract: ``Capabilities`` (what an implementation supports and which
  contract, ``strict`` or ``bridge``, it follows), ``load_impl``;
* properties: ``Property``, ``register``, ``registry``, ``check_property``,
  ``require_property``, ``run_example``, ``Executor`` (how cases reach ranks);
* the rank pool: ``RankPool``, ``get_pool``, ``shutdown_all``;
* tolerances: ``Tolerance``, ``tolerance_for``, ``compare_tensors``;
* results: ``Verdict``, ``Check``, ``PropertyOutcome``, ``ExampleRecord``, ``RunResults``.

Most users need none of it directly: the pytest plugin's ``lora_property``
fixture runs every property (see README, "Verify your own implementation").
Names are imported lazily, so ``import harness`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "ParallelLayout": "harness.layouts",
    "layout_set": "harness.settings",
    "Plan": "harness.plan",
    "Family": "harness.families",
    "register_family": "harness.families",
    "GPTCase": "harness.families.gpt.case",
    "gpt_cases": "harness.families.gpt.strategy",
    "lora_configs": "harness.strategies",
    "cases_for": "harness.strategies",
    "Capabilities": "harness.contract",
    "load_impl": "harness.contract",
    "Property": "harness.properties",
    "register": "harness.properties",
    "registry": "harness.properties",
    "check_property": "harness.driver",
    "require_property": "harness.driver",
    "run_example": "harness.driver",
    "PropertyFailure": "harness.driver",
    "Executor": "harness.runs",
    "RankPool": "harness.pool",
    "get_pool": "harness.pool",
    "shutdown_all": "harness.pool",
    "Tolerance": "harness.compare",
    "tolerance_for": "harness.compare",
    "compare_tensors": "harness.compare",
    "Verdict": "harness.results",
    "Check": "harness.results",
    "PropertyOutcome": "harness.results",
    "ExampleRecord": "harness.results",
    "RunResults": "harness.results",
}

#: Public names that differ from the name in their module.
_RENAMED = {"register_family": "register"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
