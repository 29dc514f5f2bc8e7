"""Model families: one ``Family`` record per family, and the registry the whole harness reads.

A family is a kind of megatron-core model the harness checks LoRA on (the
dense ``GPTModel``, the MoE ``GPTModel``, the ``LLaVAModel``). Everything
the harness needs to know about one lives in its folder,
``harness/families/<name>/``, and reaches the rest of the harness through
its record:

* ``case_type`` / ``shape_type``: the case and shape types (``case.py``, ``model.py``);
* ``strategy``: the hypothesis strategy of whole cases (``strategy.py``);
* ``layouts``: the family's layout set for ``--tp T --ep E`` (``layouts``);
* ``example_share``: its share of the profile's drawn examples;
* ``design``: the features its designed examples fix (``design.py``);
* ``task``, ``error_task``, ``init_task``: what ranks run (``tasks.py``, ``init.py``);
* ``builder``: the tiny megatron model it builds (``model.py``);
* ``requires``: what an implementation must declare for the family to run;
* ``properties``: the existing properties it runs besides those that name it.

The heavy parts (case and shape types, strategy, tasks, builder, design)
may be given as ``"module:name"`` strings, imported on first use: the
registry is read when a run is planned (pytest's start-up, ``lora-harness
layouts``), which then need not import torch.

Adding a family is one folder whose ``__init__.py`` calls ``register``
(built-in folders are found by name, as properties are; a plugin package
registers through the ``lora_harness.families`` entry point group). The
README's "Adding a model family" walks through it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from harness._plugins import discover

__all__ = ["Family", "FamilyDesign", "register", "get_family", "families", "family_names", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lora_harness.families"


@dataclass(frozen=True)
class FamilyDesign:
    """What the designed examples of a family fix (``harness.design`` builds the covering array).

    ``factors(layout, caps)``: the features and their levels at a layout;
    ``valid(row)``: whether a combination can be an example; ``row_of_case``:
    the features a case (JSON form) exercised; ``targets``: the family's
    targets levels (name -> target/exclude lists); ``triples``: feature
    triples that must be covered besides every pair.
    """

    factors: Callable[..., list]
    row_of_case: Callable[[Any], dict]
    targets: dict
    valid: Callable[[dict], bool] = lambda row: True
    triples: tuple = ()
    targets_for: Optional[Callable[..., dict]] = None


#: Family fields that may be a "module:name" string, imported on first access.
LAZY_FIELDS = frozenset({"case_type", "shape_type", "strategy", "task", "builder", "design", "error_task", "init_task",
                         "switch_task", "recompute_task", "training_task", "checkpoint_save_task", "checkpoint_load_task"})


@functools.lru_cache(maxsize=None)
def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"{ref!r}: a lazy family field is 'module:name'")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One model family, as the run plan, the drivers and the ranks see it (module docstring)."""

    name: str
    #: One line for headers and reports.
    description: str
    #: The case and shape types (or "module:name").
    case_type: Any
    shape_type: Any
    #: ``strategy(layout, impl, capabilities, row)`` -> a hypothesis strategy of cases
    #: (``row``: a designed example's fixed features, or None for a free draw).
    strategy: Callable[..., Any]
    #: ``layouts(max_tp, max_ep[, max_pp])`` -> the family's layouts, cheapest first (sizes already checked);
    #: a family whose function takes no ``max_pp`` has no pipeline layouts.
    layouts: Callable[[int, int, int], list]
    #: The forward/backward rank task: ``task(ctx, case) -> RankRecord``.
    task: Callable[..., Any]
    #: The model builder (documentation and tests; the tasks call it).
    builder: Callable[..., Any]
    design: FamilyDesign
    #: Share of the profile's drawn examples per property and layout (at least 1 is drawn).
    example_share: float = 1.0
    error_task: Optional[Callable[..., Any]] = None
    init_task: Optional[Callable[..., Any]] = None
    #: The adapter switch task (``harness.tasks.switch``): ``switch_task(ctx, case) -> RankRecord``.
    switch_task: Optional[Callable[..., Any]] = None
    #: The activation recompute task (``harness.tasks.recompute``): ``recompute_task(ctx, case) -> RankRecord``.
    recompute_task: Optional[Callable[..., Any]] = None
    #: The training-loop task (``harness.tasks.training``): ``training_task(ctx, case) -> RankRecord``.
    training_task: Optional[Callable[..., Any]] = None
    #: The checkpoint tasks (``harness.tasks.checkpoint``): save at the case's layout, load at its load layout.
    checkpoint_save_task: Optional[Callable[..., Any]] = None
    checkpoint_load_task: Optional[Callable[..., Any]] = None
    #: ``requires(capabilities)`` -> why an implementation cannot run this family, or None.
    requires: Callable[[Any], Optional[str]] = lambda caps: None
    #: Properties written for other families that this one runs too (its evidence supports them),
    #: besides those that name it in their own ``Property.families``.
    properties: tuple = ()
    #: Cells named by the layout alone ("tp2-ep1-..."), not "<family>:<layout>": the dense family,
    #: whose names stored results, regression files and test ids already carry.
    bare_cells: bool = False

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if isinstance(value, str) and name in LAZY_FIELDS:
            return _load(value)
        return value

    def runs(self, prop: Any) -> bool:
        """Whether property ``prop`` runs on this family (it names the family, or the family names it)."""
        return self.name in prop.families or prop.name in self.properties

    def cell(self, layout: Any) -> str:
        """The name of this family's cell at ``layout`` in results and reports."""
        name = layout.describe()
        return name if self.bare_cells else f"{self.name}:{name}"

    def test_id(self, prop: str, layout: Any) -> str:
        """The pytest id of a property cell (``forward_matches-tp2-...``, ``moe-forward_matches-tp2-...``)."""
        return f"{prop}-{layout}" if self.bare_cells else f"{self.name}-{prop}-{layout}"

    def seed_key(self, base: int, layout: Any) -> str:
        """What the hypothesis seed of a layout is hashed from (``harness.driver.layout_seed``)."""
        return f"{base}|{layout.describe()}" if self.bare_cells else f"{base}|{self.name}|{layout.describe()}"


_REGISTRY: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> Family:
    """Add a family; a second registration under the same name must be the same record."""
    if not isinstance(family, Family):
        raise TypeError(f"register() takes a harness.families.Family, got {type(family).__name__}")
    old = _REGISTRY.get(family.name)
    if old is not None and old != family:
        raise ValueError(f"a family named {family.name!r} is already registered (its case type: {old.case_type.__module__})")
    _REGISTRY[family.name] = family
    return family


#: The built-in families, in the order they run and report; others follow in registration order.
BUILTIN_ORDER = ("gpt", "moe", "vlm")


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    discover(__name__, __path__, ENTRY_POINT_GROUP, "family", packages=True, first=BUILTIN_ORDER)


def families() -> dict[str, Family]:
    """Every registered family, by name, in run order."""
    _discover()
    order = {n: i for i, n in enumerate(BUILTIN_ORDER)}
    return dict(sorted(_REGISTRY.items(), key=lambda kv: order.get(kv[0], len(order))))


def family_names() -> tuple[str, ...]:
    return tuple(families())


def get_family(name: str) -> Family:
    """The family registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    known = families()
    if name not in known:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(known)}")
    return known[name]
