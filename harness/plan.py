"""The run plan: what one run checks (families x layouts x properties), in what order, with which
example budgets and seeds, and what its failures say.

Every front end is a thin layer over it: ``lora-harness verify`` (``harness.cli``), the pytest
plugin (``harness.pytest_plugin``) and the torchrun launcher (``harness.launch``, which runs the
CLI's verify on rank 0). None of them builds cells, counts examples, derives seeds or formats a
failure itself.

    plan = Plan(tp=2, ep=2)                  # PlanError (a usage error) for anything bad
    for cell in plan.cells():                # cheap, sensitive cells first; all of them
        outcome = plan.check(cell, impl, caps, executor=..., store=...)
        print(failure_text(outcome))         # harness.results.failure_text, when it failed
    results = plan.results(outcomes, impl=..., capabilities=caps, command=...)
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from harness.families import Family, families as registered_families, get_family
from harness.layouts import ParallelLayout
from harness.settings import MAX_WORLD, layout_set

if TYPE_CHECKING:  # the property registry imports torch: a plan made at start-up need not
    from harness.properties import Property
from harness.errors import PlanError

__all__ = ["Plan", "Cell", "PlanError", "cell_order", "lead_layouts", "property_order", "layout_seed", "summary_lines"]


@dataclass(frozen=True)
class Cell:
    """One property of one family at one layout: the unit a run reports (a pytest test, a CLI line)."""

    family: Family
    layout: ParallelLayout
    prop: "Property"

    @property
    def name(self) -> str:
        """The cell's layout name in results (``tp2-...`` for the dense family, ``moe:tp2-...`` otherwise)."""
        return self.family.cell(self.layout)

    @property
    def test_id(self) -> str:
        return self.family.test_id(self.prop.name, self.layout)

    @property
    def group(self) -> str:
        """The cells of one family and layout share their runs: one scheduling group (pytest-xdist)."""
        return f"lora-{self.family.name}-{self.layout}"


def layout_seed(base: int, layout: ParallelLayout, family: str = "gpt") -> int:
    """The hypothesis seed for every property at ``layout`` in a run seeded ``base``.

    One seed per layout makes every property draw the same examples there,
    so the runs an example needs are made once and shared (``Executor``
    caches them); different layouts and different runs still draw apart.
    """
    digest = hashlib.sha256(get_family(family).seed_key(base, layout).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _parallel_score(family: str, layout: ParallelLayout) -> int:
    """How many kinds of parallelism a layout exercises (TP, EP, SP, ETP != TP, data parallelism, PP, virtual stages)."""
    experts = family == "moe"
    dp = (layout.data_parallel or 1) > 1 or (not experts and layout.ep > 1)
    return ((layout.tp > 1) + (experts and layout.ep > 1) + bool(layout.sp) + (experts and layout.etp_size != layout.tp)
            + bool(dp) + (layout.pp > 1) + (layout.vpp is not None))


def _density(cell: tuple[str, ParallelLayout]) -> tuple:
    """Sort key of a (family, layout) pair: one-rank layouts last, then most kinds of parallelism per rank first."""
    family, layout = cell
    world = layout.min_world_size
    family_rank = {f: i for i, f in enumerate(registered_families())}
    return (world == 1, -_parallel_score(family, layout) / world, world, family_rank.get(family, 99), layout.sort_key)


def _groups_apart(layout: ParallelLayout) -> bool:
    """Whether a MoE layout's expert data parallelism differs from its dense data parallelism (one
    of them > 1), so a gradient reduced over the wrong one of the two groups shows."""
    world = layout.min_world_size
    dense, expert = layout.dp(world), layout.expert_dp(world)
    return dense != expert and max(dense, expert) > 1


def lead_layouts(cells: list[tuple[str, ParallelLayout]]) -> list[tuple[str, ParallelLayout]]:
    """The (family, layout) pairs ``cell_order`` puts first, in that order: the layouts where a kind of
    bug shows on the fewest ranks (see ``cell_order``)."""
    rest = sorted(cells, key=_density)
    first = []
    for family in ("gpt", "moe"):
        best = next((c for c in rest if c[0] == family and c[1].min_world_size > 1 and c[1].pp == 1), None)
        if best is not None:
            first.append(best)
    # Then MoE with expert tensor parallelism (ETP > 1), where expert shards
    # are split and reduced, preferring a layout whose expert data
    # parallelism differs from its dense one (a gradient reduced over the
    # other group shows there), then the fewest ranks; VLM; such a MoE layout
    # of its own if the first had the groups alike; pipeline stages; and
    # dense TP without sequence parallelism: activations replicated over TP,
    # where a per-rank dropout RNG or a missing broadcast shows.
    moe = [c for c in rest if c[0] == "moe" and c[1].pp == 1]
    etp = min((c for c in moe if c[1].etp_size > 1), key=lambda c: (not _groups_apart(c[1]), c[1].min_world_size),
              default=None)
    edp = None
    if etp is None or not _groups_apart(etp[1]):
        edp = min((c for c in moe if _groups_apart(c[1])), key=lambda c: c[1].min_world_size, default=None)
    plain = next((c for c in rest if c[0] == "gpt" and c[1].tp > 1 and not c[1].sp and c[1].ep == 1 and c[1].pp == 1), None)
    pipe = min((c for c in rest if c[1].pp > 1), key=lambda c: (c[1].vpp is None, c[1].min_world_size), default=None)
    vlm = next((c for c in rest if c[0] == "vlm" and c[1].min_world_size > 1), None)
    for cell in (etp, vlm, edp, pipe, plain):
        if cell is not None and cell not in first:
            first.append(cell)
    return first


def cell_order(cells: list[tuple[str, ParallelLayout]]) -> list[tuple[str, ParallelLayout]]:
    """(family, layout) pairs in the order their cells run: cheap and sensitive first, all of them.

    First (``lead_layouts``), per family (dense, then MoE), the layout with
    the most kinds of parallelism per rank among those with TP or EP > 1
    (``--tp 2 --ep 2``: gpt tp2-sp, moe tp2-ep2-etp1-sp on two ranks), where
    most sharding bugs show; then MoE with expert TP > 1 whose expert data
    parallelism differs from the dense one (moe tp2-ep2-etp2-sp on four
    ranks: dense DP 2, expert DP 1; a DDP bucket bug that reduces dense
    adapters over the expert group, or the reverse, shows there too); VLM's
    multi-rank layout (its freezing rules fail at any TP, and only there);
    where the first had the two data-parallel groups alike, a MoE layout
    where they differ; the pipeline
    layout with virtual stages on the fewest ranks (gpt tp1-pp2-vpp2 with
    ``--pp 2``: stage-local names and chunks); dense TP without SP (gpt
    tp2, where activations are replicated over TP); then the others by
    parallelism per rank; layouts of one rank (which only the
    non-sharding checks can fail) last.
    """
    first = lead_layouts(cells)
    return first + [c for c in sorted(cells, key=_density) if c not in first]


def property_order(props: dict[str, "Property"]) -> list[tuple[str, "Property"]]:
    """Properties in the order their cells run at a layout: those that read only the runs the
    first one makes (the implementation's and the reference's) first, then by how many runs of
    their own they add; registry order otherwise. A bug a contract check sees then reports
    without waiting for the runs other checks need."""
    shared = {"impl", "reference"}
    ranked = sorted(enumerate(props.items()), key=lambda ip: (len(set(ip[1][1].needs) - shared), ip[0]))
    return [item for _, item in ranked]


class Plan:
    """One run: its families, their layouts, the properties, the example budgets and the seed.

    ``settings``: the hypothesis settings the profile gives (default: the
    active profile); ``examples``: drawn examples per property and layout,
    for every family (default: the profile's, times the family's
    ``example_share``, at least 1); ``seed``: the base seed (default: a
    random one, printed in the header so the run can be repeated);
    ``designed``: run the designed examples first (``harness.design``).
    ``families``, ``properties``, ``layouts``: restrict the run (names);
    every name is checked.
    """

    def __init__(
        self,
        tp: int = 2,
        ep: int = 1,
        *,
        pp: int = 1,
        families: Optional[Sequence[str]] = None,
        properties: Optional[Sequence[str]] = None,
        layouts: Optional[Sequence[str]] = None,
        settings: Any = None,
        examples: Optional[int] = None,
        seed: Optional[int] = None,
        designed: bool = True,
        max_world: int = MAX_WORLD,
    ) -> None:
        from harness.settings import check_seed

        known_families = tuple(registered_families())
        chosen = list(dict.fromkeys(families or known_families))
        unknown = [f for f in chosen if f not in known_families]
        if unknown:
            raise PlanError(f"unknown --family {', '.join(unknown)}; known: {', '.join(known_families)}")
        self._property_names = list(dict.fromkeys(properties)) if properties else None
        if self._property_names is not None:
            self.properties  # named properties are checked now, before any rank starts
        try:
            sets = {family: layout_set(tp, ep, family, max_world=max_world, max_pp=pp) for family in chosen}
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        if layouts:
            wanted = []
            for name in layouts:
                try:
                    wanted.append(ParallelLayout.parse(name))
                except ValueError as exc:
                    raise PlanError(f"--layout {name}: {exc}") from None
            every = {layout for family_layouts in sets.values() for layout in family_layouts}
            missing = [name for name, layout in zip(layouts, wanted) if layout not in every]
            if missing:
                raise PlanError(f"--layout {', '.join(missing)} is not in the set of --tp {tp} --ep {ep}"
                                f"{f' --pp {pp}' if pp > 1 else ''}: "
                                f"{', '.join(sorted({str(layout) for layout in every}))}")
            sets = {f: [layout for layout in ls if layout in wanted] for f, ls in sets.items()}
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise PlanError(f"--examples {examples!r}: must be an integer >= 1")
        if seed is not None:
            try:
                check_seed("--seed", seed)
            except ValueError as exc:
                raise PlanError(str(exc)) from None
        if self._property_names is None or "checkpoint_roundtrip" in self._property_names:
            from harness.checkpoint import require_writable_root

            try:
                require_writable_root()
            except OSError as exc:
                raise PlanError(str(exc)) from None
        self.tp, self.ep, self.pp = tp, ep, pp
        self.layouts: dict[str, list[ParallelLayout]] = sets
        self.examples = examples
        self.seed: int = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.designed = designed
        self._settings = settings

    # -- what runs -------------------------------------------------------------

    @functools.cached_property
    def properties(self) -> dict[str, "Property"]:
        """The properties to check, in ``property_order`` (the registry is read on first use: it imports torch)."""
        from harness.properties import registry

        props = registry()
        names = self._property_names or list(props)
        unknown = [p for p in names if p not in props]
        if unknown:
            raise PlanError(f"unknown --property {', '.join(unknown)}; known: {', '.join(props)}")
        return dict(property_order({n: props[n] for n in names}))

    def cells(self) -> list[Cell]:
        """Every cell, in run order: layouts in ``cell_order``, properties in ``property_order``."""
        pairs = cell_order([(family, layout) for family, ls in self.layouts.items() for layout in ls])
        return [
            Cell(get_family(family), layout, prop)
            for family, layout in pairs
            for prop in self.properties.values()
            if get_family(family).runs(prop)
        ]

    def settings_for(self, family: str, prop: Any = None) -> Any:
        """The hypothesis settings of a family's cells (of ``prop``'s, when given): the drawn examples
        after the designed ones, the profile's times the family's share and the property's."""
        from hypothesis import settings

        base = self._settings if self._settings is not None else settings()
        if self.examples is not None:
            return settings(base, max_examples=self.examples)
        share = get_family(family).example_share * (prop.example_share if prop is not None else 1.0)
        return settings(base, max_examples=max(1, math.ceil(base.max_examples * share)))

    def seed_for(self, cell: Cell) -> int:
        return layout_seed(self.seed, cell.layout, cell.family.name)

    def search(self, cell: Cell, impl: str, capabilities: Any, *, executor: Any, store: Any = None,
               progress: Any = None) -> Any:
        """One cell for ``impl`` as a ``harness.driver.CellSearch``, to be run in steps (nothing runs yet)."""
        from harness.driver import CellSearch

        return CellSearch(
            cell.prop, cell.layout, impl, settings=self.settings_for(cell.family.name, cell.prop), executor=executor,
            capabilities=capabilities, regressions=store, seed=self.seed_for(cell), progress=progress,
            family=cell.family.name, designed=self.designed,
        )

    def check(self, cell: Cell, impl: str, capabilities: Any, *, executor: Any, store: Any = None,
              progress: Any = None) -> Any:
        """Run one cell for ``impl``; the ``PropertyOutcome`` whatever the verdict."""
        return self.search(cell, impl, capabilities, executor=executor, store=store, progress=progress).finish()

    # -- what it says ------------------------------------------------------------

    def header(self) -> list[str]:
        """The layouts per family and the seed, one line each."""
        lines = [f"{family} layouts: {', '.join(map(str, ls))}" for family, ls in self.layouts.items()]
        lines.append(f"seed {self.seed} (--seed {self.seed} draws the same examples again)")
        return lines

    def results(self, outcomes: list, *, impl: str, capabilities: Any, command: str,
                started: Optional[str] = None, seconds: float = 0.0) -> Any:
        """The run's ``RunResults`` (results.json, the report) from its outcomes."""
        from harness.report.environment import collect_environment
        from harness.results import RunResults

        return RunResults(
            impl=impl,
            capabilities=capabilities.to_dict() if capabilities is not None else {},
            environment=collect_environment(impl.split(", ")[0]),
            skipped=capabilities.skipped() if capabilities is not None else [],
            command=command,
            started=started or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            outcomes=list(outcomes),
            seconds=seconds,
        )


def summary_lines(collected: list) -> list[str]:
    """A run's closing lines from its ``(outcome, capabilities)`` pairs: examples per layout, what the
    distinct examples exercised, and the design's paths per implementation and layout."""
    from harness.design import coverage_lines
    from harness.results import coverage

    lines = []
    per_layout: dict[tuple[str, str], int] = {}
    for outcome, _ in collected:
        key = (getattr(outcome, "family", "gpt"), outcome.layout)
        per_layout[key] = per_layout.get(key, 0) + outcome.examples
    for family in sorted({f for f, _ in per_layout}):
        lines.append(f"{family} examples per layout: "
                     + ", ".join(f"{layout} {n}" for (f, layout), n in sorted(per_layout.items()) if f == family))
    # What the distinct examples exercised, per layout (a property that shares
    # its examples with another counts them once here).
    for (family, layout), counts in sorted(coverage([o for o, _ in collected]).items()):
        extras = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "examples")
        lines.append(f"{family} {layout.split(':')[-1]}: {counts['examples']} distinct examples" + (f" ({extras})" if extras else ""))
    by_impl: dict[str, list] = {}
    for outcome, caps in collected:
        by_impl.setdefault(outcome.impl, []).append((outcome, caps))
    for impl, pairs in sorted(by_impl.items()):
        caps = next((c for _, c in pairs if c is not None), None)
        lines += [f"paths ({impl}) {line}" for line in coverage_lines([o for o, _ in pairs], caps)]
    return lines
