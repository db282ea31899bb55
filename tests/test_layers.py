"""The import graph: the runtime apps never import the development tools, and no two modules
import each other (directly or around a loop). Read from the source, so it covers imports inside
functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_APPS = ("argus", "devices", "telemetry", "bridge", "assets", "dashboard")
FIRST_PARTY = (*RUNTIME_APPS, "devtools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """First-party modules a file imports at run time (a `from package import name` that names a
    module counts as an import of that module; imports under `if TYPE_CHECKING:` do not count)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from package import module` imports that module (and the package, but that is the
            # module's own package: not an edge worth reporting).
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in FIRST_PARTY:
                found.add(name)
    return found


def _runtime_nodes(node: ast.AST) -> list[ast.AST]:
    nodes: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and ast.unparse(child.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            nodes.extend(n for orelse in child.orelse for n in [orelse, *_runtime_nodes(orelse)])
            continue
        nodes.append(child)
        nodes.extend(_runtime_nodes(child))
    return nodes


def import_graph() -> dict[str, set[str]]:
    files = [p for app in FIRST_PARTY for p in (ROOT / app).rglob("*.py") if "migrations" not in p.parts]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_it_keeps_the_development_tools_out_of_the_runtime_apps() -> None:
    offenders = {
        module: sorted(t for t in targets if t.split(".")[0] == "devtools")
        for module, targets in import_graph().items()
        if module.split(".")[0] in RUNTIME_APPS
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_it_finds_a_cycle_when_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# Each layer imports only the ones above it: argus (kernel) -> devices -> telemetry -> bridge,
# assets -> dashboard. The URL configuration is the composition root: it names every app's views.
LAYERS = {"argus": 0, "devices": 1, "telemetry": 2, "bridge": 3, "assets": 3, "dashboard": 4}
COMPOSITION_ROOTS = {"argus.urls", "argus.urls_api"}


def test_it_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_it_imports_only_from_the_layers_above() -> None:
    wrong = []
    for module, targets in sorted(import_graph().items()):
        app = module.split(".")[0]
        if app not in LAYERS or module in COMPOSITION_ROOTS:
            continue
        for target in sorted(targets):
            other = target.split(".")[0]
            if other in LAYERS and other != app and LAYERS[other] >= LAYERS[app]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
