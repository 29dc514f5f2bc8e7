"""Hypothesis profiles and the layout set: what "--tp N --ep M" and a profile mean.

Shared by the pytest plugin and the CLI so that ``pytest --tp 2`` and
``lora-harness verify --tp 2`` check exactly the same layouts with the same
example budgets.

Profiles:

* ``fast`` (the default for pytest and the CLI): enough examples per
  property and layout to catch a layout bug in CI minutes;
* ``deep``: ten times as many, for nightly runs
  (``pytest --hypothesis-profile deep`` or ``lora-harness verify --profile deep``).

Both print hypothesis's reproduction blob on failure, so a failing case can
be replayed exactly with ``@reproduce_failure``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from harness.layouts import ParallelLayout, enumerate_layouts

__all__ = ["register_profiles", "layout_set", "PROFILES", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = "fast"
PROFILES = {
    "fast": dict(max_examples=50),
    "deep": dict(max_examples=500),
}


def register_profiles() -> None:
    for name, kw in PROFILES.items():
        settings.register_profile(
            name,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            **kw,
        )


def layout_set(max_tp: int, max_ep: int = 1) -> list[ParallelLayout]:
    """The layouts the dense-model properties run at for ``--tp max_tp --ep max_ep``.

    Every TP size up to ``max_tp`` (powers of two). Expert parallelism and
    sequence parallelism do not change a dense model's sharding, and the
    properties for them (MoE experts, SP) belong to their own layout sets, so
    ``max_ep`` is accepted and validated here but does not add dense layouts.
    """
    if max_tp < 1 or max_ep < 1:
        raise ValueError(f"--tp and --ep must be >= 1 (got --tp {max_tp} --ep {max_ep})")
    return [l for l in enumerate_layouts(max_tp, 1, include_sp=False, vary_etp=False) if l.ep == 1]
