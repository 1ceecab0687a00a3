"""The project's packages import without cycles: module-level imports between dapple_tf,
graph_rewrite, planner and models form an acyclic graph (imports inside functions, used on
purpose to load TensorFlow-heavy parts on demand, are not edges)."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dapple_tf", "graph_rewrite", "planner", "models")


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


def module_level_imports(module: str, known: set[str]) -> set[str]:
    """The project modules `module` imports at module level (`from . import x` counts as
    `package.x`; a module's own package is not an edge: Python imports it first anyway)."""
    is_package = module in PACKAGES
    path = REPO / (f"{module}/__init__.py" if is_package else module.replace(".", "/") + ".py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known and name not in (module, package)}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_module_level_imports_form_no_cycle():
    known = set(module_names())
    edges = {m: module_level_imports(m, known) for m in known}
    assert sum(len(e) for e in edges.values()) > 20  # the graph was read
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-c", code, *module_names()],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
