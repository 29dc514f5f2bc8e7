"""Hypothesis profiles and the layout set: what "--tp N --ep M" and a profile mean.

Shared by the pytest plugin and the CLI so that ``pytest --tp 2`` and
``lora-harness verify --tp 2`` check exactly the same layouts with the same
example budgets.

Profiles:

* ``fast`` (the default for pytest and the CLI): the designed examples of
  every layout (``harness.design``: a covering array of the contract's
  paths, 8 to 26 per family and layout) and then 1 drawn example per
  property and layout: coverage by design, exploration by a draw, within
  CI's ten minutes on two cores;
* ``deep``: the designed examples and 250 drawn ones per dense layout
  (125 MoE, 50 VLM), for nightly runs
  (``pytest --hypothesis-profile deep`` or ``lora-harness verify --profile deep``).

A failing example is printed as a JSON case with the ``lora-harness replay``
command that reruns it, and stored in the regressions directory when one is
given, so it is replayed before new draws on every later run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from harness.layouts import ParallelLayout

__all__ = [
    "register_profiles",
    "layout_set",
    "check_world",
    "check_rank_timeout",
    "check_seed",
    "PROFILES",
    "DEFAULT_PROFILE",
    "MAX_WORLD",
    "RANK_TIMEOUT_MIN_S",
    "RANK_TIMEOUT_MAX_S",
    "SEED_LIMIT",
]

#: How many drawn examples each family takes of the profile's is its own
#: ``Family.example_share`` (``harness.families``; the run plan applies it).
DEFAULT_PROFILE = "fast"
PROFILES = {
    "fast": dict(max_examples=1),
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


#: The largest world (in ranks) a layout set may need: the largest layout of
#: ``--tp T --ep E`` runs in T*E ranks, and a local run starts one process
#: per rank (each importing torch and megatron-core, a few hundred MB). A
#: torchrun world larger than this raises the bound to its own size.
MAX_WORLD = 64

#: Bounds of ``--rank-timeout`` (seconds). Below one second no task can
#: finish (a rank's first task imports torch and megatron-core and builds a
#: model; the adaptive timeout never goes below 10 s); above a day a hang is
#: no longer detected in any useful time.
RANK_TIMEOUT_MIN_S = 1.0
RANK_TIMEOUT_MAX_S = 86400.0

#: Seeds (``--seed``, ``--lora-seed``) are 0 <= seed < SEED_LIMIT, the range random seeds are drawn from.
SEED_LIMIT = 2**32


def check_rank_timeout(value: object) -> float:
    """``value`` as a rank timeout in seconds, or ``ValueError`` saying which rule it breaks.

    The message starts with the value (``"1e-09 must be ..."``); callers prefix the flag.
    """
    import math

    text = value if isinstance(value, str) else repr(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{text!s} is not a number of seconds") from None
    shown = f"{seconds:g}"
    bounds = f"from {RANK_TIMEOUT_MIN_S:g} to {RANK_TIMEOUT_MAX_S:g}"
    if math.isnan(seconds):
        raise ValueError(f"{shown} is not a number of seconds ({bounds})")
    if not math.isfinite(seconds):
        raise ValueError(
            f"{shown} must be a finite number of seconds, {bounds} (an infinite timeout would turn hang detection off)"
        )
    if not seconds > 0:
        raise ValueError(f"{shown} must be a positive number of seconds, {bounds}")
    if seconds < RANK_TIMEOUT_MIN_S:
        raise ValueError(
            f"{shown} must be at least {RANK_TIMEOUT_MIN_S:g} second (a rank task starts a process group, "
            "imports torch and megatron-core and builds a model; the default is 60)"
        )
    if seconds > RANK_TIMEOUT_MAX_S:
        raise ValueError(
            f"{shown} must be at most {RANK_TIMEOUT_MAX_S:g} seconds (one day; a longer ceiling leaves a hang undetected)"
        )
    return seconds


def check_seed(flag: str, value: object) -> int:
    """``value`` if it is a seed (an integer, 0 <= seed < 2**32), else ``ValueError`` naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{flag} {value!r}: must be an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)")
    return value


def check_world(max_tp: int, max_ep: int = 1, limit: int = MAX_WORLD, max_pp: int = 1) -> None:
    """``ValueError`` when the largest layout of ``--tp max_tp --ep max_ep --pp max_pp`` needs more than ``limit`` ranks."""
    import os

    world = max_tp * max_ep * max_pp
    if world > limit:
        pp = f" --pp {max_pp}" if max_pp > 1 else ""
        raise ValueError(
            f"--tp {max_tp} --ep {max_ep}{pp}: the largest layout of the set needs a world of {world} ranks, "
            f"more than the {limit} the harness runs (a local run starts one process per rank; "
            f"this machine has {os.cpu_count() or 'an unknown number of'} CPUs); use a smaller --tp, --ep or --pp"
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


def layout_set(max_tp: int, max_ep: int = 1, family: str = "gpt", max_world: int = MAX_WORLD,
               max_pp: int = 1) -> list[ParallelLayout]:
    """The layouts a family's properties run at for ``--tp max_tp --ep max_ep --pp max_pp``, cheapest first.

    The one layout enumerator: every front end (CLI, pytest, torchrun) reads
    it through the run plan (``harness.plan``). A maximum that is not a
    power of two is refused (``ValueError``), never rounded, and so is a set
    whose largest layout needs more than ``max_world`` ranks (``MAX_WORLD``,
    64, by default). What each family runs is its own
    (``harness.families.<name>.layouts``): dense GPT every power-of-two TP
    times every power-of-two EP (as data parallelism), TP > 1 also with
    sequence parallelism, and with ``max_pp`` > 1 pipeline layouts (every
    power-of-two PP, with and without virtual stages); MoE every TP, EP and
    expert TP whose world fits, with SP at TP > 1, plus expert data
    parallelism; VLM TP 1 and the two largest TPs, never SP or EP. Families
    without pipeline layouts yet (MoE, VLM) ignore ``max_pp``.
    """
    from harness.families import get_family

    _check_max("--tp", max_tp)
    _check_max("--ep", max_ep)
    _check_max("--pp", max_pp)
    check_world(max_tp, max_ep, max_world, max_pp)
    enumerate_layouts = get_family(family).layouts
    if max_pp == 1 or not _takes_pp(enumerate_layouts):
        # A family whose ``layouts`` takes no ``max_pp`` has no pipeline layouts.
        return enumerate_layouts(max_tp, max_ep)
    return enumerate_layouts(max_tp, max_ep, max_pp)


def _takes_pp(fn: object) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)
