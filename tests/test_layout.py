"""The house rules of the layout, read from the source (README "Layout"):

- imports point one way: ``cli`` -> ``sim`` -> (``client``, ``dispatcher``) -> ``store`` ->
  ``scheduling`` -> ``models``/``errors``; ``workers`` (the Celery side) may import ``broker``,
  never the other way round;
- the scheduling wing is pure: no Redis, Celery, kombu, and nothing of the layers above it;
- no module imports another that (through others) imports it back;
- modules stay small.

Every import counts, also one inside a function (a late import still ties the modules
together); imports under ``if TYPE_CHECKING:`` are for the type checker only and do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("broker", "workers")
MAX_LINES = 420

# Lower layers first; a module may import its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("broker.errors",),
    ("broker.models",),
    ("broker.redis_urls",),
    ("broker.scheduling",),
    ("broker.settings",),
    ("broker.store",),
    ("broker.message",),
    ("broker.native",),
    ("broker.celery_conf",),
    ("broker.client", "broker.dispatcher", "broker"),
    ("broker.sim",),
    ("broker.cli",),
    ("workers",),
]
PURE_FORBIDDEN = ("redis", "celery", "kombu", "billiard", "vine", "broker.settings", "broker.store",
                  "broker.client", "broker.dispatcher", "broker.message", "broker.celery_conf", "broker.sim",
                  "broker.cli", "workers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str) -> set[str]:
    """What module ``name`` imports: modules where one is named (``from pkg import submodule``
    counts as the submodule), packages otherwise."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


GRAPH = {name: {i for i in imports_of(name) if i in MODULES and i != name} for name in MODULES}


def layer_of(name: str) -> int:
    best = -1, -1  # (length of the matching prefix, layer)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    assert best[1] >= 0, f"{name} is in no layer: add it to LAYERS"
    return best[1]


def test_every_module_is_in_a_layer_and_the_graph_is_read() -> None:
    assert "broker.scheduling.planner" in MODULES and "broker.store.records" in MODULES
    assert "broker.store.records" in GRAPH["broker.store.reads"]  # `from broker.store import records`
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    upward = sorted(i for i in GRAPH[name] if layer_of(i) > layer_of(name))
    assert not upward, f"{name} (layer {LAYERS[layer_of(name)]}) imports a layer above it: {upward}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("broker.scheduling")))
def test_scheduling_is_pure(name: str) -> None:
    bad = sorted(i for i in imports_of(name) if any(i == f or i.startswith(f + ".") for f in PURE_FORBIDDEN))
    assert not bad, f"{name} is in the pure scheduling wing but imports {bad}"


def test_no_module_imports_in_a_cycle() -> None:
    """Tarjan's strongly connected components over the import graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert not cycles, f"modules importing each other: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it by what it does"
