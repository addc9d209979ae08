"""The package's import structure: its layers, no import cycles, no private name used across modules.

Walks the source with :mod:`ast` (nothing is imported), so imports inside functions and
``TYPE_CHECKING`` blocks count like any other. ``python tests/test_imports.py`` prints the report.

The layers (docs/ARCHITECTURE.md says what each holds) are a contract: a part of the package
(a subpackage, or a module at the top) imports only parts in layers below its own; parts that share
a layer are independent of each other; an import into another subpackage goes through that
subpackage's ``__init__`` (its public names), never into one of its modules; and nothing inside
imports the top-level ``nngp_dask`` facade.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nngp_dask"


# Lowest first. Each entry is one layer: the parts in it may import any part of a lower layer and none
# of the same or a higher one. The order is read off the real imports: the cluster runtime sits below
# build and gp because both ask it for a client; plots sits below select because a sweep draws its
# own figure, and above validation whose result types it draws.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "_blas", "tiling", "fields", "tomlfile", "monitor", "defaults"),  # foundations: no imports from the package
    ("kernels", "linalg"),  # the mathematics: pure functions on arrays; no Dask, no Zarr, no tiles
    ("store",),  # the Zarr layout (paths, local or remote), the kernel store, its lock and input sources
    ("cluster",),  # the Dask runtime; asks the store layer whether a configured path is remote
    ("build", "gp"),  # a kernel into a store; regression on a stored kernel
    ("validation",),  # finite-width Monte Carlo against the kernel
    ("plots",),  # drawing only
    ("select",),  # sweeps reusing one Gram matrix
    ("pipeline", "estimators"),  # the declarative pipeline; scikit-learn estimators
    ("validate_cli",),
    ("cli",),
    ("__main__",),  # python -m nngp_dask
]


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


def part_of(module: str) -> str:
    """The layer part of ``nngp_dask.<part>[.…]``: its subpackage, or the module itself at the top."""
    return module.split(".")[1] if "." in module else module


def _layer_index() -> dict[str, int]:
    return {part: i for i, layer in enumerate(LAYERS) for part in layer}


def layer_violations(edges: dict[str, set[str]], pkg: str = PACKAGE.name) -> list[str]:
    """Every import that breaks the layer contract, as ``"importer -> imported: why"``."""
    layer = _layer_index()
    subpackages = {part_of(m) for m in edges if m.count(".") >= 2}
    found = []
    for mod, targets in sorted(edges.items()):
        if mod == pkg:
            continue  # the facade re-exports from every layer
        src = part_of(mod)
        for target in sorted(targets):
            if target == pkg:
                found.append(f"{mod} -> {target}: imports the top-level facade")
                continue
            dst = part_of(target)
            if dst == src:
                continue
            if src not in layer or dst not in layer:
                found.append(f"{mod} -> {target}: {src if src not in layer else dst} is in no layer (add it to LAYERS)")
            elif layer[dst] > layer[src]:
                found.append(f"{mod} -> {target}: up from layer {layer[src]} ({src}) to layer {layer[dst]} ({dst})")
            elif layer[dst] == layer[src]:
                found.append(f"{mod} -> {target}: across layer {layer[src]} ({src} and {dst} are independent)")
            elif dst in subpackages and target != f"{pkg}.{dst}":
                found.append(f"{mod} -> {target}: into a module of {dst}; import its public names from {pkg}.{dst}")
    return found


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


def test_layers_import_only_downwards():
    edges, _ = import_graph()
    assert layer_violations(edges) == []


def test_every_part_is_in_a_layer():
    edges, _ = import_graph()
    parts = {part_of(m) for m in edges if m != PACKAGE.name}
    assert parts == set(_layer_index()), "LAYERS and the package's parts differ"


def test_layer_check_catches_violations():
    # the check itself: an upward import, one across a layer, one into another subpackage's module,
    # and one of the facade are each reported
    edges = {
        "nngp_dask.kernels.tiles": {"nngp_dask.store"},
        "nngp_dask.build.driver": {"nngp_dask.gp"},
        "nngp_dask.gp.regression": {"nngp_dask.store.kernel_store"},
        "nngp_dask.select.sweep": {"nngp_dask"},
        "nngp_dask.store.kernel_store": set(),
    }
    found = layer_violations(edges)
    assert len(found) == 4
    assert any("up from layer 1 (kernels) to layer 2 (store)" in f for f in found)
    assert any("across layer" in f for f in found)
    assert any("into a module of store" in f for f in found)
    assert any("top-level facade" in f for f in found)


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert private == []


if __name__ == "__main__":
    edges, private = import_graph()
    print(f"modules: {len(edges)}, imports: {sum(map(len, edges.values()))}")
    print("import cycles:", cycles(edges) or "none")
    print("private names crossing modules:", private or "none")
    print("layer violations:", layer_violations(edges) or "none")
