"""Hypothesis profiles and the layout set: what "--tp N --ep M" and a profile mean.

Shared by the pytest plugin and the CLI so that ``pytest --tp 2`` and
``lora-harness verify --tp 2`` check exactly the same layouts with the same
example budgets.

Profiles:

* ``fast`` (the default for pytest and the CLI): enough examples per
  property and layout to catch a layout bug in CI minutes;
* ``deep``: ten times as many, for nightly runs
  (``pytest --hypothesis-profile deep`` or ``lora-harness verify --profile deep``).

A failing example is printed as a JSON case with the ``lora-harness replay``
command that reruns it, and stored in the regressions directory when one is
given, so it is replayed before new draws on every later run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from harness.layouts import ParallelLayout

__all__ = ["register_profiles", "layout_set", "PROFILES", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = "fast"
PROFILES = {
    "fast": dict(max_examples=25),
    "deep": dict(max_examples=250),
}


def register_profiles() -> None:
    for name, kw in PROFILES.items():
        settings.register_profile(
            name,
            deadline=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            **kw,
        )


def _check_max(flag: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} {value!r}: must be an integer >= 1")
    if value & (value - 1):
        raise ValueError(
            f"{flag} {value}: the layout set runs every power of two up to the maximum "
            f"(the harness models have power-of-two widths); use {1 << (value.bit_length() - 1)} or {1 << value.bit_length()}"
        )
    return value


def layout_set(max_tp: int, max_ep: int = 1, family: str = "gpt") -> list[ParallelLayout]:
    """The layouts a family's properties run at for ``--tp max_tp --ep max_ep``, cheapest first.

    Dense GPT: every power-of-two TP up to ``max_tp`` times every
    power-of-two EP up to ``max_ep``. A dense model has no experts, so EP
    changes what megatron-core builds only through the world size: a layout
    with EP=e runs in a world of lcm(tp, tp*e) ranks, i.e. with data
    parallelism e, where every data-parallel replica must hold and compute
    the same adapters. Every layout with TP > 1 also runs with sequence
    parallelism. A maximum that is not a power of two is refused
    (``ValueError``), never rounded.
    """
    _check_max("--tp", max_tp)
    _check_max("--ep", max_ep)
    if family != "gpt":
        raise ValueError(f"no layout set for family {family!r}; known: gpt")
    layouts = {
        ParallelLayout(tp=tp, ep=ep, sp=sp)
        for tp in _powers(max_tp)
        for ep in _powers(max_ep)
        for sp in ((False, True) if tp > 1 else (False,))
    }
    return sorted(layouts, key=lambda layout: layout.sort_key)


def _powers(n: int) -> list[int]:
    return [1 << k for k in range(n.bit_length()) if 1 << k <= n]
