"""The shape of the build package: how the modules of tasks/ may import each other."""

from __future__ import annotations

import ast

from tasks import paths


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """The tasks/ modules a module imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tasks":  # from tasks import catalog, paths
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("tasks."):  # from tasks.pbtxt import render
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):  # import tasks.paths
            found.update(
                alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tasks.")
            )
    return found & known


def import_graph() -> dict[str, set[str]]:
    """module -> the tasks/ modules it imports."""
    files = {f.stem: f for f in sorted(paths.TASKS_DIR.glob("*.py")) if f.stem != "__init__"}
    return {
        name: imported_modules(ast.parse(file.read_text(), str(file)), set(files)) - {name}
        for name, file in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" once cleared

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_graph_sees_imports_at_every_level():
    tree = ast.parse(
        "from tasks import paths, catalog\n"
        "import tasks.errors\n"
        "def f():\n"
        "    from tasks.facts import checkpoint_facts\n"
        "    import json\n"
    )
    known = {"paths", "catalog", "errors", "facts", "pbtxt"}
    assert imported_modules(tree, known) == {"paths", "catalog", "errors", "facts"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules_of_tasks():
    graph = import_graph()
    assert {"parity", "generation_parity", "bench", "perf_analyzer"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in tasks/: " + " -> ".join(cycle)


def test_facts_and_comparisons_are_leaves():
    """Values are passed down to them; they never import a stage back."""
    graph = import_graph()
    assert graph["facts"] <= {"paths", "artifacts"}
    assert graph["compare"] <= {"catalog", "errors"}
    for leaf in ("paths", "catalog", "errors"):  # what the leaves themselves import
        assert not graph[leaf], leaf
