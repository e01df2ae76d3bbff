"""No import circles inside the package: every ``import``/``from ... import`` of ``lightning_transfer.*`` (at module
level and inside functions) is an edge of a graph between its modules, and the graph has no cycle.

A function-level import breaks a circle at run time, but the two modules still need each other: neither can be read,
tested or moved without the other. ``if TYPE_CHECKING:`` blocks are left out (they never run). Edges:

- ``import P.x.y``: to ``P.x.y``.
- ``from P.x import y``: to ``P.x.y`` where that is a module, otherwise (a name defined or re-exported by ``P.x``) to
  ``P.x``. So a package's ``__init__`` importing its own submodules is an edge down, and only a submodule that imports
  a name its package's ``__init__`` re-exports makes the circle back up. Importing ``P.x.y`` runs ``P/x/__init__.py``
  first, but that is no edge: it is how every package works, not a dependency of the importer.
- ``import_submodules(__name__, __path__)`` in a package's ``__init__`` (registration by discovery): to each of its
  public submodules, which it imports.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import lightning_transfer


@dataclass
class ImportGraph:
    """Modules of one package; ``edges[a][b]`` is where ``a`` imports ``b`` (``file:line``, the first such place)."""

    modules: dict[str, Path]
    packages: set[str]
    edges: dict[str, dict[str, str]] = field(default_factory=dict)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` (function bodies included) outside ``if TYPE_CHECKING:`` bodies."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(module: str, node: ast.AST, graph: ImportGraph) -> list[str]:
    """The package modules that the statement ``node`` in ``module`` imports."""
    if isinstance(node, ast.Import):
        targets = []
        for alias in node.names:  # `import a.b.c` imports a.b.c (the longest part that is a module)
            parts = alias.name.split(".")
            for end in range(len(parts), 0, -1):
                if (name := ".".join(parts[:end])) in graph.modules:
                    targets.append(name)
                    break
        return targets
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package (a package's __init__ is its own package)
            package = module if module in graph.packages else module.rpartition(".")[0]
            anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{anchor}.{base}" if base else anchor
        targets = []
        for alias in node.names:
            if f"{base}.{alias.name}" in graph.modules:
                targets.append(f"{base}.{alias.name}")
            elif base in graph.modules:
                targets.append(base)
        return targets
    if isinstance(node, ast.Call) and module in graph.packages:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "import_submodules":  # discovery: it imports every public submodule of this package
            return [m for m in graph.modules if m.rpartition(".")[0] == module
                    and not m.rpartition(".")[2].startswith("_")]
    return []


def import_graph(package: str, path: list[str]) -> ImportGraph:
    """The import graph between the modules of ``package`` (found with ``pkgutil.walk_packages`` under ``path``)."""
    names = [package, *(info.name for info in pkgutil.walk_packages(path, f"{package}."))]
    modules: dict[str, Path] = {}
    packages = set()
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        modules[name] = Path(spec.origin)
        if spec.submodule_search_locations is not None:
            packages.add(name)
    graph = ImportGraph(modules, packages)
    for module, source in modules.items():
        out = graph.edges.setdefault(module, {})
        for node in _statements(ast.parse(source.read_text(), str(source))):
            for target in _targets(module, node, graph):
                if target != module:
                    out.setdefault(target, f"{source.name}:{getattr(node, 'lineno', '?')}")
    return graph


def cycles(graph: ImportGraph) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:  # the graph is small (~100 modules): recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph.edges):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, sorted(component)) for component in components]


def _one_cycle(graph: ImportGraph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component (breadth first)."""
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.edges.get(node, {})):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt in members and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{component} is no cycle")


def describe(graph: ImportGraph, cycle: list[str]) -> str:
    """``a -> b (a.py:3) | b -> a (b.py:1)``, and every other import between the modules of the cycle's component."""
    steps = [f"{a} -> {b} ({graph.edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    members = _component(graph, cycle[0])
    others = [f"{a} -> {b} ({where})" for a in sorted(members) for b, where in sorted(graph.edges[a].items())
              if b in members and (a, b) not in set(zip(cycle, cycle[1:]))]
    return " | ".join(steps) + ("".join(f"\n    also {edge}" for edge in others) if others else "")


def _component(graph: ImportGraph, start: str) -> set[str]:
    """The modules that ``start`` reaches and that reach ``start``."""
    def reach(edges: dict[str, set[str]]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for nxt in edges.get(stack.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    forward = {a: set(out) for a, out in graph.edges.items()}
    backward: dict[str, set[str]] = {}
    for a, out in graph.edges.items():
        for b in out:
            backward.setdefault(b, set()).add(a)
    return reach(forward) & reach(backward)


def test_the_package_has_no_import_cycles():
    graph = import_graph("lightning_transfer", list(lightning_transfer.__path__))
    assert len(graph.modules) > 50 and "lightning_transfer.cli" in graph.modules
    found = cycles(graph)
    assert not found, "import cycles (break each by moving what both need below both):\n" + "\n".join(
        describe(graph, c) for c in found)


@pytest.fixture
def write_package(tmp_path, monkeypatch):
    """Write ``{relative path: source}`` under a folder on ``sys.path``; its modules leave ``sys.modules`` after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(files: dict[str, str]) -> list[str]:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(textwrap.dedent(text))
        written.extend({name.split("/")[0] for name in files})
        return [str(tmp_path / written[-1])]

    yield write
    for name in [m for m in sys.modules if m.split(".")[0] in written]:
        del sys.modules[name]


def test_the_graph_finds_cycles_through_functions_and_re_exports_and_skips_type_checking(write_package):
    path = write_package({
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "A = 1\ndef f():\n    from pkg.b import g\n",  # a cycle through a function-level import
        "pkg/b.py": "import pkg.a\ndef g():\n    pass\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n",
        "pkg/d.py": "from pkg import c\nD = 1\n",  # a submodule, not the __init__: no cycle with c
        "pkg/sub/__init__.py": "from pkg.sub.e import E\n",
        "pkg/sub/e.py": "E = 1\ndef h():\n    from pkg.sub import F\n",  # its package's re-export: a cycle
        "pkg/sub/f.py": "from .e import E\nF = E\n",
    })
    graph = import_graph("pkg", path)
    assert graph.edges["pkg.d"] == {"pkg.c": "d.py:1"} and graph.edges["pkg.c"] == {}
    assert graph.edges["pkg.sub.f"] == {"pkg.sub.e": "f.py:1"}
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub", "pkg.sub.e", "pkg.sub"]]
    assert describe(graph, ["pkg.a", "pkg.b", "pkg.a"]) == "pkg.a -> pkg.b (a.py:3) | pkg.b -> pkg.a (b.py:1)"


@pytest.mark.parametrize("discovered", [True, False])
def test_discovery_imports_are_edges(write_package, discovered):
    name = f"disc_{discovered}".lower()
    path = write_package({
        f"{name}/__init__.py": f"from {name}._helpers import import_submodules\n"
                               + ("import_submodules(__name__, __path__)\n" if discovered else ""),
        f"{name}/_helpers.py": "def import_submodules(name, path):\n    pass\n",
        f"{name}/member.py": f"from {name} import NAME\n",  # a re-export of the __init__, which imports it
    })
    graph = import_graph(name, path)
    assert cycles(graph) == ([[name, f"{name}.member", name]] if discovered else [])
