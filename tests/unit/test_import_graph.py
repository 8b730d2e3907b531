"""Layering of the anneal package: no import cycles between its modules, and no embedded driver in the operator.

The check is static: every module is parsed with `ast` and every import statement counts, at
module level or inside a function, since a lazy import is still a dependency (it only moves the
failure from import time to run time). A package's `__init__` is a node of its own, with edges
only for what it imports itself.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANNEAL = REPO / "platform" / "anneal"
OPERATOR = REPO / "operators" / "anneal_operator"

#: Modules of the embedded (local Ray) driver, which the Kubernetes driver must not import.
EMBEDDED_DRIVER = ("anneal.local",)


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (a package's `__init__` by the package's)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """The absolute dotted names the module's import statements (anywhere in it) refer to.

    `from a.b import c` yields `a.b.c`, which `resolve` maps to `a.b.c` if that is a module and to
    `a.b` if `c` is a name defined in `a.b`; relative imports are made absolute first.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (its longest prefix that is a module), or None if none is."""
    parts = name.split(".")
    while parts:
        if (candidate := ".".join(parts)) in modules:
            return candidate
        parts.pop()
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of other modules of the same set."""
    graph = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imported_names(module, path)}
        graph[module] = targets - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while (member := stack.pop()) != node:
                on_stack.discard(member)
                component.add(member)
            on_stack.discard(node)
            component.add(node)
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(cycle: frozenset[str], graph: dict[str, set[str]]) -> str:
    """A cycle as its modules and the imports between them, for a failure message."""
    edges = [f"    {a} -> {b}" for a in sorted(cycle) for b in sorted(graph[a] & cycle)]
    return "  cycle of " + ", ".join(sorted(cycle)) + ":\n" + "\n".join(edges)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a dotted name is one of `prefixes` or inside one of them."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def chain_to(graph: dict[str, set[str]], start: str, prefixes: tuple[str, ...]) -> list[str] | None:
    """The shortest import chain from `start` to a module within `prefixes`, or None."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if within(node, prefixes):
            chain = [node]
            while (up := parent[chain[-1]]) is not None:
                chain.append(up)
            return chain[::-1]
        for succ in sorted(graph.get(node, ())):
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    return None


def driver_imports(operator: dict[str, Path], anneal: dict[str, Path]) -> list[str]:
    """Each operator import that reaches the embedded driver, directly or through other anneal modules."""
    graph = import_graph(anneal)
    found = []
    for module, path in operator.items():
        for name in sorted(imported_names(module, path)):
            if within(name, EMBEDDED_DRIVER):
                found.append(f"{module} imports {name}")
            elif (start := resolve(name, anneal)) is not None and (chain := chain_to(graph, start, EMBEDDED_DRIVER)):
                found.append(f"{module} imports {' -> '.join(chain)}")
    return sorted(set(found))


def write_package(root: Path, files: dict[str, str], package: str = "pkg") -> Path:
    for rel, text in files.items():
        path = root / package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / package


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "from pkg.a import x\n"},
                     [{"pkg.a", "pkg.b"}], id="module-level"),
        pytest.param({"__init__.py": "", "a.py": "from pkg import b\n",
                      "b.py": "def f():\n    from pkg.a import x\n"},
                     [{"pkg.a", "pkg.b"}], id="function-level"),
        pytest.param({"__init__.py": "", "sub/__init__.py": "", "sub/a.py": "from . import b\n",
                      "sub/b.py": "from ..c import y\n", "c.py": "class C:\n    def m(self):\n"
                      "        from pkg.sub.a import z\n"},
                     [{"pkg.sub.a", "pkg.sub.b", "pkg.c"}], id="relative-and-method"),
        pytest.param({"__init__.py": "from pkg.a import x\n", "a.py": "from pkg import y\n"},
                     [{"pkg", "pkg.a"}], id="package-init-reexport"),
        pytest.param({"__init__.py": "", "a.py": "import pkg.b\nimport os\n", "b.py": "from pkg import c\n",
                      "c.py": "import json\n"},
                     [], id="chain-without-cycle"),
        pytest.param({"__init__.py": "", "sub/__init__.py": "", "sub/a.py": "from pkg.sub import b\n",
                      "sub/b.py": "from pkg.sub.a import x\n", "c.py": "from pkg.sub.a import x\n",
                      "d.py": "import pkg.c\n"},
                     [{"pkg.sub.a", "pkg.sub.b"}], id="only-the-circle-reported"),
    ],
)
def test_cycle_finder(tmp_path: Path, files: dict[str, str], expected: list[set[str]]) -> None:
    root = write_package(tmp_path, files)
    graph = import_graph(module_files(root, "pkg"))
    assert sorted(map(sorted, cycles(graph))) == sorted(map(sorted, expected))


def test_no_import_cycles() -> None:
    graph = import_graph(module_files(ANNEAL, "anneal"))
    found = cycles(graph)
    assert not found, "import cycles in anneal (cut an edge; lazy imports count too):\n" + "\n".join(
        describe(c, graph) for c in sorted(found, key=sorted))


def test_driver_check_finds_direct_and_indirect_imports(tmp_path: Path) -> None:
    anneal = write_package(tmp_path, {
        "__init__.py": "", "api.py": "", "runtime/__init__.py": "", "local/__init__.py": "", "local/runner.py": "",
        "runtime/plan.py": "def build():\n    from anneal.local.runner import run\n",
    }, package="anneal")
    operator = write_package(tmp_path, {
        "__init__.py": "", "clean.py": "from anneal.api import Spec\nfrom anneal_operator import clean\n",
        "direct.py": "from anneal.local import runner\n", "local.py": "import anneal.local.runner\n",
        "indirect.py": "def handler():\n    from anneal.runtime.plan import build\n",
    }, package="anneal_operator")
    assert driver_imports(module_files(operator, "anneal_operator"), module_files(anneal, "anneal")) == [
        "anneal_operator.direct imports anneal.local.runner",
        "anneal_operator.indirect imports anneal.runtime.plan -> anneal.local.runner",
        "anneal_operator.local imports anneal.local.runner",
    ]


def test_operator_does_not_import_the_embedded_driver() -> None:
    found = driver_imports(module_files(OPERATOR, "anneal_operator"), module_files(ANNEAL, "anneal"))
    assert not found, "the Kubernetes driver depends on the embedded driver:\n  " + "\n  ".join(found)
