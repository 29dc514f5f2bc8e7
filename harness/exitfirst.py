"""Under ``pytest -x``: the first round of a scope, so that a bug a later cell or layout sees reports next.

Its one job: decide what runs before the first cell of a scheduling scope
(one family and layout, or several lead layouts) finishes, when the run
stops at its first failure. The pytest plugin (``HarnessSession.check``,
``FirstRounds``) asks for it; nothing here runs without ``-x``.

A user's CI stops at the first failure, so what counts there is how soon
the first failing verdict comes. The cells of a layout run one after
another, each through all its examples, so a bug only the eighth cell sees
would wait for the seven before it; and a layout's cells all run before
the next layout's start, so a bug only the fifth layout shows would wait
for four whole layouts. Instead, the first cell of an xdist scope first
takes every collected cell of it (cells are
``harness.driver.CellSearch``es, run in steps), layout by layout in cell
order, through

1. its stored regressions and first ``FIRST_ROUNDS`` designed examples;
2. then, row by row, the other designed examples of that layout's cells
   that read only ``SHARED_RUNS``: one example's runs serve all of them.

A scope is one family and layout, except the lead layouts
(``harness.plan.lead_layouts``), which the pytest plugin deals out to the
workers under ``-x`` (``lead_scopes``): each worker's first scope holds
every n-th of them, so the first rounds of all lead layouts come before
any of them runs its remaining examples.

A cell that fails there is reported next; the cells before it end as
skipped (``defer_reason``). When nothing fails, every cell goes on from
where the round left it: nothing runs twice and nothing is left out, and a
cell's examples and outcome are those of a run without ``-x``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["FIRST_ROUNDS", "SHARED_RUNS", "CollectedCell", "FirstRounds", "first_round", "defer_reason", "lead_scopes"]

#: Designed examples per cell the first round runs for every cell of a layout, in cell order. The
#: rows run in ``harness.design``'s order, the most telling first (``row_priority``).
FIRST_ROUNDS = 1
#: The runs the first cell of a layout makes for every example (``Property.needs``), and the
#: float64 reference (one world-size-1 run; the first cell makes it too for 16-bit examples).
SHARED_RUNS = frozenset({"impl", "reference", "reference64"})


@dataclass(frozen=True)
class CollectedCell:
    """A collected property cell (a pytest item's ``lora_property``) and its scheduling scope."""

    family: str
    layout: Any
    name: str
    impl: str
    capabilities: Any
    scope: str


class FirstRounds:
    """The collected cells of a pytest process and the first rounds run so far (one per scope,
    implementation and capabilities)."""

    def __init__(self) -> None:
        self.collected: list[CollectedCell] = []
        self._rounds: dict[tuple, dict[tuple, Any]] = {}

    def note(self, bound: list[tuple[str, Any]]) -> None:
        """The collected cells, in run order: (scope, ``BoundProperty``) pairs."""
        self.collected = [CollectedCell(b.family, b.layout, b.name, b.impl, b.capabilities, scope) for scope, b in bound]

    def search(self, plan: Any, key: tuple, impl: str, capabilities: Any, *, executor: Any,
               store: Any) -> tuple[Optional[Any], str]:
        """The cell ``key`` (family, layout text, property)'s search, its scope's first round run
        (the first time it is asked for), and why it ends as skipped (``defer_reason``); (None, "")
        for a cell that was not collected."""
        scope = next((c.scope for c in self.collected if (c.family, str(c.layout), c.name) == key), None)
        if scope is None:
            return None, ""
        mine = (scope, impl, repr(capabilities))
        if mine not in self._rounds:
            cells = [c for c in self.collected
                     if c.scope == scope and c.impl == impl and repr(c.capabilities) == repr(capabilities)]
            self._rounds[mine] = first_round(plan, cells, impl, capabilities, executor=executor, store=store)
        searches = self._rounds[mine]
        return searches.get(key), defer_reason(searches, key)


def first_round(plan: Any, cells: list[CollectedCell], impl: str, capabilities: Any, *, executor: Any,
                store: Any) -> dict[tuple, Any]:
    """Each cell's ``CellSearch`` (by (family, layout text, property)), taken through the first round,
    one layout after another in the order of ``cells``; it stops at the first cell that fails."""
    from harness.families import get_family
    from harness.plan import Cell
    from harness.properties import get_property

    searches = {
        (c.family, str(c.layout), c.name): plan.search(Cell(get_family(c.family), c.layout, get_property(c.name)), impl,
                                                        capabilities, executor=executor, store=store)
        for c in cells
    }
    layouts: dict[tuple, list] = {}
    for (family, layout, _), search in searches.items():
        layouts.setdefault((family, layout), []).append(search)
    for mine in layouts.values():
        for _ in range(FIRST_ROUNDS):
            for search in mine:
                if search.designed_step() and search.failing:
                    return searches
        shared = [s for s in mine if set(s.prop.needs) <= SHARED_RUNS]
        while any(s.designed_left for s in shared):
            for search in shared:
                if search.designed_left and search.designed_step() and search.failing:
                    return searches
    return searches


@functools.lru_cache(maxsize=None)
def lead_scopes(plan: Any, workers: int) -> dict[str, str]:
    """Under ``-x``: the scheduling scope of each lead layout's cells (``lora-<family>-<layout>``) ->
    the scope they run in instead, ``lora-lead-<i mod workers>`` for the i-th lead layout, so that
    each of the ``workers`` starts with a scope that holds several of them (its first round takes
    each of them through their first examples before any finishes). Made once per plan and worker
    count (the xdist scheduler asks for every test it schedules); callers share the dict."""
    from harness.plan import lead_layouts

    pairs = [(family, layout) for family, layouts in plan.layouts.items() for layout in layouts]
    return {f"lora-{family}-{layout}": f"lora-lead-{i % max(1, workers)}"
            for i, (family, layout) in enumerate(lead_layouts(pairs))}


def defer_reason(searches: dict[tuple, Any], key: tuple) -> str:
    """Why the cell ``key`` ends as skipped: another cell of its round failed and it did not
    (the run stops at that failure); "" when it runs on."""
    mine = searches.get(key)
    failing = [f"{s.outcome.prop} at {s.outcome.layout}" for k, s in searches.items() if s.failing and k != key]
    if mine is None or mine.failing or not failing:
        return ""
    return (f"not finished: {', '.join(failing)} failed on a stored or designed example, and the run stops at the "
            "first failure (-x); without -x every cell runs whole")
