"""The property registry: each property family is one module of this package.

A module registers its property with ``register(Property(...))``: a name,
the model families and layouts it applies to, the runs it needs (see
``harness.runs.RUN_KINDS``) and its check, a function of an ``Evidence``
returning a ``harness.results.Check``. The driver, the CLI, the pytest
plugin and the reports find properties here, so adding a property is adding
a module (or, from another package, an entry point in the group
``lora_harness.properties`` naming a module that calls ``register``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from harness._plugins import discover
from harness.contract import Capabilities
from harness.layouts import ParallelLayout
from harness.results import Check

__all__ = ["Property", "register", "registry", "get_property", "property_names"]

ENTRY_POINT_GROUP = "lora_harness.properties"


@dataclass(frozen=True)
class Property:
    """One property family.

    ``kind``: ``"numeric"`` (outputs/gradients against the reference) or
    ``"contract"`` (a SPEC behaviour). ``applies(layout, capabilities)``
    returns None when the property runs there, else the reason it is
    skipped. ``needs``: the run kinds the check reads, made lazily and
    shared with the other properties of the same example. ``designed``:
    whether the cell starts with the designed examples (``harness.design``);
    False for a property whose task draws its own inputs and reads none of
    the features the design varies (it runs drawn examples only).
    ``design_factors``: family -> the design's features the property's task
    reads, where that is fewer than all: its designed examples are then the
    covering array over those features alone (the others at their plainest
    value), so a cheap-to-decide property does not pay for rows it cannot tell
    apart (``harness.design.designed_rows(only=...)``). ``example_share``: the
    property's share of the family's drawn examples (a property whose example
    runs several models draws fewer; at least one is always drawn). ``pipeline``: whether the
    property runs at pipeline layouts (pp > 1): True for every family, or the families whose
    tasks for it build pipeline stages; elsewhere it is skipped there, with that reason.
    """

    name: str
    check: Callable[..., Check]
    needs: tuple[str, ...]
    doc: str
    families: tuple[str, ...] = ("gpt",)
    kind: str = "numeric"
    applies: Optional[Callable[[ParallelLayout, Capabilities], Optional[str]]] = None
    designed: bool = True
    # Left out of the hash (a dict): a Property stays hashable, as its Cell is.
    design_factors: Optional[dict[str, tuple[str, ...]]] = field(default=None, hash=False)
    example_share: float = 1.0
    pipeline: Union[bool, tuple[str, ...]] = False

    def runs_at_pipeline_layouts(self, family: str) -> bool:
        return self.pipeline is True or (isinstance(self.pipeline, tuple) and family in self.pipeline)

    def skip_reason(self, family: str, layout: ParallelLayout, capabilities: Capabilities) -> Optional[str]:
        if family not in self.families:
            from harness.families import families

            known = families().get(family)
            if known is None or not known.runs(self):
                return f"{self.name} does not apply to the {family} family"
        if layout.pp > 1 and not self.runs_at_pipeline_layouts(family):
            return (f"{self.name} does not run at the {family} family's pipeline layouts yet (pp={layout.pp}): its "
                    "rank task builds one stage-less model")
        return self.applies(layout, capabilities) if self.applies else None


_REGISTRY: dict[str, Property] = {}
_discovered = False


def register(prop: Property) -> Property:
    """Add a property; a second registration under the same name must be the same property."""
    if not isinstance(prop, Property):
        raise TypeError(f"register() takes a harness.properties.Property, got {type(prop).__name__}")
    old = _REGISTRY.get(prop.name)
    if old is not None and old.check is not prop.check:
        raise ValueError(f"a property named {prop.name!r} is already registered (from {old.check.__module__})")
    _REGISTRY[prop.name] = prop
    return prop


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    discover(__name__, __path__, ENTRY_POINT_GROUP, "property")


def registry() -> dict[str, Property]:
    """Every registered property, by name, in a stable order."""
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (_ORDER.get(kv[0], 99), kv[0])))


# The order reports list the built-in families in: outputs, then gradients, then contract.
_ORDER = {
    "forward_matches": 0, "backward_matches": 1, "init_matches_layouts": 2, "adapters_follow_spec": 3,
    "errors_follow_spec": 4, "merge_matches": 5, "shared_expert_adapters_identical": 6, "ep_size_independent": 7,
    "init_follows_distribution": 8, "dropout_follows_spec": 9,
    "vlm_freezing_follows_spec": 20,
}


def property_names(family: Optional[str] = None) -> list[str]:
    if family is None:
        return list(registry())
    from harness.families import get_family

    return [n for n, p in registry().items() if get_family(family).runs(p)]


def get_property(name: str) -> Property:
    props = registry()
    if name not in props:
        raise ValueError(f"unknown property {name!r}; known: {', '.join(props)}")
    return props[name]
