"""Private Horovod and TensorFlow names are used in one module only, `dapple_tf/compat.py`,
where each has its reason and the version it was checked against."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "dapple_tf" / "compat.py"
SOURCES = ("dapple_tf", "graph_rewrite", "planner", "models", "launch", "bench", "train.py")


def private_imports(path: Path) -> list[str]:
    """`module` or `module.name` for each import of a private TensorFlow or Horovod module or
    name (`tensorflow.python`, a `_`-prefixed name) in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            names = []
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [node.module]
            names = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            if not module.startswith(("tensorflow", "horovod")):
                continue
            parts = module.split(".")
            if module.startswith("tensorflow.python") or any(p.startswith("_") for p in parts):
                found.append(module)
            found += [f"{module}.{n}" for n in names if n.startswith("_")]
    return found


def test_private_tensorflow_and_horovod_names_are_imported_only_by_compat():
    paths = []
    for source in SOURCES:
        root = REPO / source
        paths += [root] if root.is_file() else sorted(root.rglob("*.py"))
    offenders = {
        str(p.relative_to(REPO)): private_imports(p)
        for p in paths
        if p != COMPAT and private_imports(p)
    }
    assert not offenders, offenders


def test_compat_itself_is_seen_by_the_check():
    assert "tensorflow.python.util._pywrap_util_port" in private_imports(COMPAT)
