"""The layering of `hf_llqrsam/llqr` (issue 21): read from the source with `ast`, not from what happens to import.

* the module import graph inside `llqr/` is acyclic, counting every import (module level, in functions, under
  `TYPE_CHECKING`);
* no module imports a sibling inside a function (the old way of dodging a cycle);
* `llqr/` imports nothing from `transformers`, `accelerate` or `datasets`, and nothing of `hf_llqrsam` outside
  `llqr/`: the math is pure torch and sits at the bottom, every arrow points down into it;
* every module imports on its own, in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hf_llqrsam.llqr

PACKAGE = "hf_llqrsam.llqr"
ROOT = Path(hf_llqrsam.llqr.__file__).parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
FORBIDDEN = ("transformers", "accelerate", "datasets")


def _imports(module: str) -> list[tuple[str, bool]]:
    """Every import of `module` as (absolute target, inside a function), `from . import x` resolved to `llqr.x`."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(), filename=f"{module}.py")
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    out = []
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            out += [(alias.name, nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.module or "", nested))
                continue
            base = PACKAGE.split(".")[: len(PACKAGE.split(".")) - (node.level - 1)]
            if node.module:
                out.append((".".join([*base, node.module]), nested))
            else:  # `from . import x`: each name is a module of the package
                out += [(".".join([*base, alias.name]), nested) for alias in node.names]
    return out


def _sibling(target: str) -> str | None:
    """The llqr module a target names (`hf_llqrsam.llqr.fit.x` → `fit`), `None` outside llqr."""
    prefix = PACKAGE + "."
    if not target.startswith(prefix):
        return None
    return target[len(prefix) :].split(".")[0]


def _graph() -> dict[str, set[str]]:
    return {m: {s for t, _ in _imports(m) if (s := _sibling(t)) is not None and s in MODULES} for m in MODULES}


def test_the_parser_sees_relative_imports():
    """The oracle itself: `preconditioner` imports `state` and `refresh`, `fit` imports `solvers`."""
    graph = _graph()
    assert {"state", "refresh", "apply", "schedules"} <= graph["preconditioner"]
    assert "solvers" in graph["fit"] and "structures" in graph["structures_ext"]


def test_llqr_import_graph_is_acyclic():
    graph = _graph()
    order, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        if state[node] == 1:
            cycle = path[path.index(node) :] + [node]
            pytest.fail(f"import cycle in hf_llqrsam/llqr: {' -> '.join(cycle)}")
        if state[node] == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        state[node] = 2
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    assert len(order) == len(MODULES)


def test_no_function_level_import_of_a_sibling():
    late = [(m, t) for m in MODULES for t, nested in _imports(m) if nested and _sibling(t) is not None]
    assert late == [], f"function-level imports inside hf_llqrsam/llqr: {late}"


@pytest.mark.parametrize("module", ["__init__", *MODULES])
def test_llqr_imports_no_hf_library_and_nothing_above_it(module):
    targets = [t for t, _ in _imports(module)] if module != "__init__" else _init_imports()
    bad = [t for t in targets if t.split(".")[0] in FORBIDDEN]
    above = [t for t in targets if t.split(".")[0] == "hf_llqrsam" and _sibling(t) is None and t != PACKAGE]
    assert bad == [] and above == [], f"{module}: HF libraries {bad}, hf_llqrsam outside llqr {above}"


def _init_imports() -> list[str]:
    tree = ast.parse((ROOT / "__init__.py").read_text())
    return [
        f"{PACKAGE}.{n.module}" if n.level else (n.module or "")
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
    ]


ALONE = """
import importlib, sys, types
root, package, modules = sys.argv[1], sys.argv[2], sys.argv[3:]
for module in modules:
    for name in [n for n in sys.modules if n == "hf_llqrsam" or n.startswith("hf_llqrsam.")]:
        del sys.modules[name]
    # bare packages: neither __init__ runs, so the module's own imports decide the order siblings load in
    for name, path in (("hf_llqrsam", root + "/.."), (package, root)):
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    importlib.import_module(f"{package}.{module}")
print("ok", len(modules))
"""


def test_each_module_imports_alone():
    """Each module imported first, with the package `__init__`s bypassed: the orders an import cycle would break."""
    run = subprocess.run(
        [sys.executable, "-c", ALONE, str(ROOT), PACKAGE, *MODULES], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", str(len(MODULES))]
