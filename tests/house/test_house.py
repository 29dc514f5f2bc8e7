"""The house drawn from its imports: no circle, no arrow running up, no file grown past its job.

The harness is built in layers (README, "Layout of the code"): plain data
and helpers at the bottom, then cases and the family registry, the family
folders, the rank pool and executor, the properties, the driver, the run
plan, the reports, and the front ends on top. A module may import from its
own layer and the ones below, never from above (a lazy import inside a
function counts too: it is still an arrow). Module-level imports form no
cycle. Read statically from the source, so nothing is imported here.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Layers, bottom first: (layer, module prefixes). The longest matching prefix decides.
LAYERS = (
    (0, ("harness._quiet", "harness._plugins", "harness.errors", "harness.layouts", "harness.compare", "harness.stats",
         "harness.dropout", "harness.cpu", "harness.gloo", "harness.megatron_state", "harness.results", "harness.contract", "harness.sharding", "harness.rules",
         "harness.bridge", "harness.evidence", "harness.report.environment", "harness.report.model", "harness.pipeline")),
    (1, ("harness.settings", "harness.cases", "harness.strategies", "harness.design", "harness.tasks", "harness.training",
         "harness.checkpoint")),
    (2, ("harness.families",)),
    (3, ("harness.runner", "harness.pool", "harness.runs")),
    (4, ("harness.properties",)),
    (5, ("harness.driver", "harness.regressions")),
    (6, ("harness.plan", "harness.exitfirst")),
    (7, ("harness.report",)),
    (8, ("harness.cli", "harness.pytest_plugin", "harness.launch")),
)
#: Modules that sit in a lower layer than their folder: the family registry itself (the record
#: type and the lookup every layer reads; the family folders below it are layer 2).
EXACT = {"harness.families": 1, "harness": 9}

#: Files longer than this say why in README.md ("Layout of the code").
MAX_LINES = 520
LONG_FILES_EXPLAINED = {"harness/bridge.py", "lora/reference/megatron_free.py", "harness/cpu.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "harness").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    if module in EXACT:
        return EXACT[module]
    best = (-1, -1)
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (layer, len(prefix))
    assert best[0] >= 0, f"{module} is in no layer of tests/house/test_house.py: place it"
    return best[0]


def _edges() -> list[tuple[str, str, bool]]:
    """(importer, imported module, at module level) for every harness import inside harness/."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            at_top = id(node) in top
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == "harness" or target.startswith("harness."):
                    found = resolve(target)
                    if found and found != module:
                        edges.append((module, found, at_top))
    return edges


def test_no_import_runs_up_a_layer():
    up = sorted({(a, b) for a, b, _ in _edges() if _layer(b) > _layer(a) and not b.startswith(a + ".")})
    assert not up, "imports that run up a layer:\n" + "\n".join(f"  {a} ({_layer(a)}) -> {b} ({_layer(b)})" for a, b in up)


def test_module_level_imports_form_no_circle():
    graph = collections.defaultdict(set)
    for a, b, top in _edges():
        if top and not b.startswith(a + "."):
            graph[a].add(b)
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_check_sees_an_arrow_running_up(monkeypatch):
    """The check itself can fail: a driver-level import from the settings layer is reported."""
    edges = _edges() + [("harness.settings", "harness.driver", False)]
    monkeypatch.setattr(sys.modules[__name__], "_edges", lambda: edges)
    try:
        test_no_import_runs_up_a_layer()
    except AssertionError as exc:
        assert "harness.settings (1) -> harness.driver (5)" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an upward import was not reported")


def test_no_file_over_about_500_lines_unless_the_readme_says_why():
    readme = (ROOT / "README.md").read_text()
    long = []
    for folder in ("harness", "lora"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES and not (rel in LONG_FILES_EXPLAINED and rel in readme):
                long.append(f"{rel}: {lines} lines")
    assert not long, "files past about 500 lines without a reason in README.md: " + ", ".join(long)
