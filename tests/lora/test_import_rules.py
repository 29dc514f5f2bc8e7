"""Import rules that keep the oracle independent of the implementation under test.

`lora.reference` (the harness's oracle) and `lora.megatron` (under test) share
no code: each imports without the other, neither needs `lora._common` (gone),
and the one module both may import, `lora._spec`, holds plain data only. The
harness does not import `lora` at all (it loads the implementation by name).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_BLOCKER = '''
import importlib.abc, sys

BLOCKED = {blocked!r}
PREFIXES = {prefixes!r}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or any(name == p or name.startswith(p + ".") for p in PREFIXES):
            raise ImportError(f"blocked by test_import_rules: {{name}}")
        return None


sys.meta_path.insert(0, _Block())
'''


def _run_blocked(body: str, *, blocked: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(blocked=set(blocked), prefixes=tuple(prefixes)) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "OK" in proc.stdout, proc.stdout


def test_megatron_imports_and_works_with_the_reference_blocked():
    pytest.importorskip("megatron.core")
    proc = _run_blocked(
        """
        import warnings
        import torch
        from torch import nn

        import lora.megatron
        from lora.megatron import LoRA, LoRAMerge, VLMLoRA, merge_lora
        assert "lora.reference" not in sys.modules

        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("linear_fc1", nn.Linear(4, 6))
        model.add_module("linear_fc2", nn.Linear(6, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = LoRA(dim=2, lora_B_init_method="normal")(model)
        assert hasattr(model.linear_fc1, "to_wrap") and hasattr(model.linear_fc1, "adapter")
        model.eval()
        x = torch.randn(3, 4)
        adapted = model(x)
        merged = merge_lora(model)
        assert isinstance(merged.linear_fc1, nn.Linear)
        torch.testing.assert_close(merged(x), adapted)
        out = LoRAMerge().merge(torch.ones(3, 2), torch.ones(3, 1), torch.ones(1, 2), 4, 2)
        assert torch.equal(out, torch.full((3, 2), 3.0))
        assert "lora.reference" not in sys.modules and "lora._common" not in sys.modules
        print("OK")
        """,
        blocked=("lora.reference",),
    )
    _assert_ok(proc)


def test_reference_imports_and_works_with_megatron_blocked():
    proc = _run_blocked(
        """
        import warnings
        import torch
        from torch import nn

        from lora.reference import LoRA, LoRAMerge, VLMLoRA, merge_lora

        model = nn.Sequential()
        model.add_module("linear_fc1", nn.Linear(4, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = LoRA(dim=2, lora_B_init_method="normal")(model)
        model.eval()
        x = torch.randn(3, 4)
        adapted = model(x)
        torch.testing.assert_close(merge_lora(model)(x), adapted)
        assert not any(m == "lora.megatron" or m.startswith("lora.megatron.") for m in sys.modules)
        assert "megatron" not in sys.modules and "lora._common" not in sys.modules
        print("OK")
        """,
        prefixes=("lora.megatron", "megatron"),
    )
    _assert_ok(proc)


def test_lora_common_is_gone():
    assert not (ROOT / "lora" / "_common.py").exists()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lora._common")


def _modules_of(package: str) -> list[str]:
    """The package and every module file under it, as dotted names (found on disk, so a new file is checked too)."""
    folder = ROOT.joinpath(*package.split("."))
    return [package] + sorted(f"{package}.{path.stem}" for path in folder.glob("*.py") if path.stem != "__init__")


REFERENCE_MODULES = _modules_of("lora.reference")
MEGATRON_MODULES = _modules_of("lora.megatron")


def test_module_lists_are_what_the_packages_hold():
    # Both implementations are packages split by job (the single-file lora/reference.py
    # and lora/megatron/_base.py are gone). A new module is checked by the tests below
    # whatever its name; list it here too.
    assert not (ROOT / "lora" / "reference.py").exists()
    jobs = ["adapters", "config", "freeze", "init", "layers", "lora", "matching", "merge", "walk"]
    assert REFERENCE_MODULES == ["lora.reference"] + [f"lora.reference.{m}" for m in jobs]
    jobs = ["config", "dense_adapters", "expert_adapters", "expert_checkpoint", "freeze", "init", "layout", "lora", "matching",
            "merge", "recompute", "walk", "wrapper"]
    assert MEGATRON_MODULES == ["lora.megatron"] + [f"lora.megatron.{m}" for m in jobs]


@pytest.mark.parametrize("module", REFERENCE_MODULES + MEGATRON_MODULES)
def test_no_source_names_the_other_side(module):
    # Beyond import-time: no lazy import of the other implementation or of lora._common either.
    source = inspect.getsource(importlib.import_module(module))
    forbidden = ["lora._common", "from lora import _common"]
    if module in REFERENCE_MODULES:
        forbidden += ["from lora.megatron", "import lora.megatron", "from lora import megatron"]
    else:
        forbidden += ["from lora.reference", "import lora.reference", "from lora import reference"]
    for needle in forbidden:
        assert needle not in source, f"{module} contains {needle!r}"


def _lora_imports(module: str) -> list[str]:
    """Every module of the ``lora`` package that ``module``'s source imports (any scope, TYPE_CHECKING included)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{module}: relative import (level {node.level}); write lora.<...> in full")
    return [name for name in found if name == "lora" or name.startswith("lora.")]


@pytest.mark.parametrize("module", REFERENCE_MODULES + MEGATRON_MODULES)
def test_each_side_imports_only_itself_and_the_spec(module):
    own = "lora.reference" if module in REFERENCE_MODULES else "lora.megatron"
    for name in _lora_imports(module):
        # `from lora import _spec` shows up as "lora" and "lora._spec"; `from lora._spec import X` as "lora._spec.X".
        ok = name == "lora" or any(name == p or name.startswith(p + ".") for p in ("lora._spec", own))
        assert ok, f"{module} imports {name}: only lora._spec and {own}.* are allowed"


_DATA_TYPES = (str, tuple, list, dict, frozenset, int, float, bool, type(None))


def _is_plain_data(value) -> bool:
    if isinstance(value, (tuple, list, frozenset)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain_data(k) and _is_plain_data(v) for k, v in value.items())
    return type(value) in _DATA_TYPES


def _only_frozenset_calls(node: ast.AST) -> bool:
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    lambdas = [n for n in ast.walk(node) if isinstance(n, ast.Lambda)]
    return not lambdas and all(isinstance(c.func, ast.Name) and c.func.id == "frozenset" for c in calls)


def test_spec_module_is_plain_data():
    import lora._spec as spec

    # "@py_builtins"/"@pytest_ar": pytest's assertion rewriting marks every module of the
    # distribution that ships a pytest11 plugin; they are not the module's own names.
    public = {name: value for name, value in vars(spec).items() if not name.startswith(("_", "@"))}
    assert {"DEFAULT_TARGET_MODULES", "INIT_METHODS", "DROPOUT_POSITIONS", "TE_LINEAR_CLASS_NAMES"} <= set(public)
    for name, value in public.items():
        assert not inspect.isfunction(value) and not inspect.isclass(value) and not inspect.ismodule(value), name
        assert not callable(value), name
        assert _is_plain_data(value), f"lora._spec.{name} is {type(value).__name__}, not plain data"
    assert spec.INIT_METHODS == ("xavier", "xavier_uniform", "kaiming", "normal", "zero")
    # Nothing but a docstring and assignments: no imports, functions or classes.
    tree = ast.parse(inspect.getsource(spec))
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        assert is_docstring or isinstance(node, (ast.Assign, ast.AnnAssign)), ast.dump(node)[:200]
        assert _only_frozenset_calls(node), ast.dump(node)[:200]
    assert spec.DEFAULT_TARGET_MODULES == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def test_harness_does_not_import_lora():
    """The harness owns its contract: every module of it imports with ``lora`` blocked."""
    proc = _run_blocked(
        """
        import importlib, pkgutil
        import harness
        for info in pkgutil.walk_packages(harness.__path__, "harness."):
            importlib.import_module(info.name)
        harness.registry()
        assert not any(m == "lora" or m.startswith("lora.") for m in sys.modules)
        print("OK")
        """,
        prefixes=("lora",),
    )
    _assert_ok(proc)


def _pool_imports(path: Path) -> set[str]:
    """The ``harness.pool`` modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness.pool"):
            if node.module == "harness.pool":  # submodules by name; anything else comes from the package's __init__
                submodules = {a.name for a in node.names if (ROOT / "harness" / "pool" / f"{a.name}.py").exists()}
                found |= {f"harness.pool.{name}" for name in submodules}
                if len(submodules) < len(node.names):
                    found.add("harness.pool")
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness.pool")}
    return found


def test_the_rank_pool_is_a_package_of_small_acyclic_modules_with_one_job_each():
    package = ROOT / "harness" / "pool"
    modules = {f"harness.pool.{p.stem}": p for p in package.glob("*.py") if p.stem != "__init__"}
    assert {"messages", "timeouts", "faults", "rank", "pool", "forkserver", "lifecycle"} <= {m.rsplit(".", 1)[1] for m in modules}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "one job" in doc, f"{name}: its docstring must state its one job"
        assert len(path.read_text().splitlines()) <= 500, f"{name} has grown past 500 lines"
        imports = _pool_imports(path)
        assert "harness.pool" not in imports, f"{name} imports the package, whose __init__ imports it back"
        graph[name] = imports - {name}
    # No cycle among the modules (the package's __init__ only imports them).
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        assert name not in chain, "import cycle: " + " -> ".join(chain + (name,))
        if name in done:
            return
        for dep in graph.get(name, ()):
            visit(dep, chain + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_harness_runner_is_only_a_re_export_and_the_harness_imports_the_pool():
    runner = ROOT / "harness" / "runner.py"
    tree = ast.parse(runner.read_text())
    assert all(isinstance(n, (ast.Expr, ast.ImportFrom, ast.Assign)) for n in tree.body), "harness/runner.py only re-exports"
    users = [p for d in ("harness", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")
             if p != runner and "harness.runner" in p.read_text() and p.name not in ("test_runner.py", "test_import_rules.py", "test_house.py")]
    assert users == [], f"import harness.pool, not harness.runner: {users}"


def test_the_torchrun_executor_keeps_no_copy_of_the_pools_machinery():
    source = (ROOT / "harness" / "launch.py").read_text()
    tree = ast.parse(source)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"_task_name", "_resolve", "_indent", "_report", "_deadline_s"}, defined
    for needed in ("harness.pool.faults", "harness.pool.messages", "harness.pool.timeouts"):
        assert needed in _pool_imports(ROOT / "harness" / "launch.py"), needed
