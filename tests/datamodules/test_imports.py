"""No import circles inside ``lightning_transfer.datamodules``: every import, at module level or in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_transfer.datamodules as package

PACKAGE = package.__name__
FOLDER = Path(package.__file__).parent


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sibling modules ``path`` imports (``"__init__"`` for the package itself), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from .files import x`` / ``from . import files``
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            if base == PACKAGE:  # ``from lightning_transfer.datamodules import files`` or ``... import Digits``
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
            elif base.startswith(PACKAGE + "."):
                found.add(base[len(PACKAGE) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in FOLDER.glob("*.py")}
    graph = {p.stem: _imports(p, modules) - {p.stem} for p in FOLDER.glob("*.py")}
    graph["__init__"] = modules - {"__init__"}  # it imports every submodule (import_submodules): adding a file
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, deterministic order)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_a_function_level_circle():
    # the circle this suite was written for: files imported folder's build_transform inside a method
    assert find_cycle({"files": {"base", "folder"}, "folder": {"files"}, "base": set()}) == ["files", "folder", "files"]
    assert find_cycle({"files": {"base", "transforms"}, "folder": {"files", "transforms"}}) is None


def test_imports_of_the_source_are_read_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from lightning_transfer.datamodules.files import x\n"
                      "def f():\n    from lightning_transfer.datamodules import folder, Digits\n")
    assert _imports(source, {"files", "folder"}) == {"files", "folder", "__init__"}


def test_no_import_circles_in_datamodules():
    graph = import_graph()
    assert {"base", "files", "folder", "transforms"} <= set(graph)
    assert "transforms" in graph["files"] and "transforms" in graph["folder"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle in {PACKAGE}: {' -> '.join(cycle)}; move what both need into a module " \
                          "both import (as transforms.py holds the transforms)"
