"""The package's layout holds: no import circles, layers import downward only, no private names
across modules, each third-party library imported by one module (docs/ARCHITECTURE.md).

Read from the source with ``ast`` (every import counts: top-level, inside functions, under
``TYPE_CHECKING``). The layers are the table in docs/ARCHITECTURE.md, so the document and
the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "tether"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

#: Third-party libraries behind a seam, and the one module that may import each.
OWNERS = {
    "picows": "tether.transport.picows",
    "redis": "tether.rooms.redis",
    "multidict": "tether.conn",
    "prometheus_client": "tether.metrics",
    "starlette": None,  # ASGI is a protocol: tether never imports an ASGI framework
    "uvicorn": None,
}
#: namedtuple's API: public names that start with an underscore.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def tether_edges(name: str) -> set[str]:
    """The tether modules that module ``name`` imports (``from pkg import module`` included)."""
    edges = set()
    for module, imported, _ in imports(name):
        if not module.startswith("tether"):
            continue
        submodule = f"{module}.{imported}"
        edges.add(submodule if imported is not None and submodule in MODULES else module)
    edges.discard(name)
    return {edge for edge in edges if edge in MODULES}


def test_every_import_of_a_tether_module_resolves() -> None:
    for name in MODULES:
        for module, _, line in imports(name):
            if module.startswith("tether"):
                assert module in MODULES, f"{name}:{line} imports {module}, which does not exist"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk of ``graph`` meets (empty: none)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_circles() -> None:
    cycles = find_cycles({name: tether_edges(name) for name in MODULES})
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def private_imports(found: list[tuple[str, str | None, int]]) -> list[str]:
    """The imports in ``found`` that take a private name or module from tether."""
    bad = []
    for module, imported, line in found:
        if not module.startswith("tether"):
            continue
        private_module = any(part.startswith("_") and not part.startswith("__") for part in module.split("."))
        private_name = imported is not None and imported.startswith("_") and not imported.startswith("__")
        if private_module or private_name:
            bad.append(f"{line}: {imported or module} from {module}")
    return bad


def test_no_private_name_imported_from_another_tether_module() -> None:
    bad = [f"{name}:{entry}" for name in MODULES for entry in private_imports(imports(name))]
    assert bad == []


def test_private_attributes_are_touched_only_through_self() -> None:
    """``other._slot`` from outside its class is how the old Conn was driven: never again."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or node.attr in NAMEDTUPLE_API:
                continue
            bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


def layers() -> list[list[str]]:
    """The layer table of docs/ARCHITECTURE.md, bottom first: each row's backticked names."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", ARCHITECTURE.read_text(), flags=re.M)
    assert rows, "docs/ARCHITECTURE.md has no layer table"
    assert [int(n) for n, _ in rows] == list(range(len(rows)))
    return [re.findall(r"`(tether[\w.]*)`", names) for _, names in rows]


def layer_of(name: str, table: list[list[str]]) -> int:
    """The layer of module ``name``: the row naming it or the closest package above it."""
    for candidate in [name, *(name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1))]:
        for level, names in enumerate(table):
            if candidate in names:
                return level
    raise AssertionError(f"{name} is in no layer of docs/ARCHITECTURE.md")


def test_every_module_has_a_layer() -> None:
    table = layers()
    for name in MODULES:
        layer_of(name, table)


def test_layers_import_only_their_own_layer_or_below() -> None:
    table = layers()
    bad = []
    for name in MODULES:
        mine = layer_of(name, table)
        for edge in tether_edges(name):
            theirs = layer_of(edge, table)
            if theirs > mine:
                bad.append(f"{name} (layer {mine}) imports {edge} (layer {theirs})")
    assert bad == []


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_third_party_library_has_one_importing_module(library: str) -> None:
    importers = sorted(
        name for name in MODULES if any(module == library or module.startswith(library + ".") for module, _, _ in imports(name))
    )
    owner = OWNERS[library]
    assert importers == ([owner] if owner else [])


def test_pure_layer_imports_no_io() -> None:
    """proto/ is bytes and events only (STYLE.md item 1): no asyncio, sockets or clocks."""
    io = {"asyncio", "socket", "time", "selectors", "threading", "random"}
    for name in MODULES:
        if name.startswith("tether.proto"):
            used = {module.split(".")[0] for module, _, _ in imports(name)}
            assert not used & io, f"{name} imports {used & io}"


def test_the_checks_find_what_they_look_for() -> None:
    """Not vacuous: a circle, a private import and real edges are all seen."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert private_imports([("tether.conn", "_now", 3), ("tether._old", "x", 4), ("asyncio.tasks", "_enter_task", 5)]) == [
        "3: _now from tether.conn",
        "4: x from tether._old",
    ]
    assert sum(len(tether_edges(name)) for name in MODULES) > 50
    assert "tether.conn" in tether_edges("tether.transport.picows")
    assert "tether.transport.picows" in tether_edges("tether.server.server")
