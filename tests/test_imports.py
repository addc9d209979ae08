"""The package's import structure: no import cycles, and no private name used across modules.

Walks the source with :mod:`ast` (nothing is imported). ``python tests/test_imports.py``
prints the report.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nngp_dask"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """``(module -> modules of the package it imports, "module: use" of each private name of another
    module)``; imports inside functions and ``TYPE_CHECKING`` blocks count as well."""
    mods = _modules(root)
    pkg = root.name
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target != pkg and not target.startswith(pkg + "."):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in mods:  # `from . import x`: a module
                        edges[mod].add(full)
                        aliases.add(alias.asname or alias.name)
                    elif target in mods:
                        edges[mod].add(target)
                        if _private(alias.name):
                            private.append(f"{mod}: from {target} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        edges[mod].add(alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and _private(node.attr):
                private.append(f"{mod}: {node.value.id}.{node.attr}")
    for mod in edges:  # a package imports its own submodules; that is not a cycle
        edges[mod] = {t for t in edges[mod] if not mod.startswith(t + ".") and t != mod}
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert private == []


if __name__ == "__main__":
    edges, private = import_graph()
    print(f"modules: {len(edges)}, imports: {sum(map(len, edges.values()))}")
    print("import cycles:", cycles(edges) or "none")
    print("private names crossing modules:", private or "none")
