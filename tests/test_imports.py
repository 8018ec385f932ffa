"""The package's import graph, read from the source with ast (nothing is imported): no cycles, and no layer
imports a higher one. Imports inside functions count (a lazy import still ties two modules together); those
under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

SDRT = Path(__file__).resolve().parents[1] / "sdrt"
# each layer may import those listed after it, not those before (ARCHITECTURE.md); others (cli, bench, demo,
# errors, ...) are outside the ladder
LADDER = ("sdrt.serve", "sdrt.engines", "sdrt.runtime")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SDRT.rglob("*.py"):
        parts = list(path.relative_to(SDRT.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _runtime_nodes(tree: ast.AST):
    """Every node outside ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod].update(n for n in names if n in mods and n != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_of_every_kind():
    graph = import_graph()
    assert "sdrt.runtime.requests" in graph["sdrt.runtime.pipeline"]          # module level
    assert "sdrt.runtime.images" in graph["sdrt.runtime.pipeline"]            # inside a method only
    assert "sdrt.runtime.manifest" not in graph["sdrt.runtime.families"]      # only for type checking
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_layer_imports_a_higher_one():
    def layer(mod: str) -> int | None:
        return next((i for i, top in enumerate(LADDER) if mod == top or mod.startswith(top + ".")), None)

    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if layer(m) is not None and layer(t) is not None and layer(t) < layer(m)]
    assert upward == []
