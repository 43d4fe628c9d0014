"""The shape of the code: no runner module imports itself back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def imports() -> dict[str, set[str]]:
    """runner module -> the runner modules it imports anywhere (function level and TYPE_CHECKING too)."""
    found: dict[str, set[str]] = {}
    for path in RUNNER.rglob("*.py"):
        name = ".".join(path.relative_to(RUNNER.parent).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[name] = {n for n in names if n.startswith("runner")}
    return {m: {d for d in deps if d in found and d != m} for m, deps in found.items()}


def test_no_import_cycles():
    graph = imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_import_graph_is_read_right():
    graph = imports()
    assert "runner.steps.inputs" in graph["runner.plan"] and "runner.recipe.schema" in graph["runner.steps.inputs"]
