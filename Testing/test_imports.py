"""No import cycle in the core: a static graph of every `import deepmri...` in deepmri/, lazy ones too.

Imports inside functions count: they are how the store, fetch and importers used to import
each other. An import of a package's submodule counts as an edge to that submodule only (a
package `__init__` that re-exports its submodules is not a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import deepmri

PACKAGE = Path(deepmri.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("deepmri"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _is_package_edge(source: str, target: str) -> bool:
    return source.startswith(target + ".")


def test_no_import_cycle_in_deepmri():
    graph = import_graph()
    assert "deepmri.models.store" in graph and graph["deepmri.models.store"]
    # Edges from a submodule up to its own package come from Python's import machinery, not a
    # design choice: leave them out.
    graph = {
        name: {target for target in targets if not _is_package_edge(name, target)}
        for name, targets in graph.items()
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_modules_import_first_in_a_fresh_interpreter():
    # fetch and importers used to need the store imported first
    code = "import deepmri.models.fetch, deepmri.models.importers, deepmri.models.store"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_reading_every_task_declaration_imports_neither_torch_nor_monai():
    """The CLI builds its parser from every declaration at each start, and Slicer reads them
    before PyTorch may be installed: declarations must stay free of the heavy libraries."""
    probe = (
        "import sys\n"
        "from deepmri.cli import build_parser\n"
        "from deepmri.tasks import available_tasks, get_task\n"
        "build_parser()\n"
        "tasks = [get_task(name) for name in available_tasks()]\n"
        "print(len(tasks), sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    count, heavy = completed.stdout.strip().split(" ", 1)
    assert int(count) >= 5
    assert heavy == "[]", f"declaring the tasks imported {heavy}"
