"""The import rules of the three layers: data flows kernels ← sparse_ops ← bench.

``kernels/`` (installed as ``sparse_ops_kernels``) imports nothing from ``sparse_ops`` or
``bench/`` (``sparse_ops_bench``); ``sparse_ops`` never imports ``bench/``. Read from the
source (every ``import`` and ``from … import``, at any depth, relative imports kept
inside their package), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder → the import names it may not use (the installed names and the folder names)
FORBIDDEN = {
    "kernels": ("sparse_ops", "sparse_ops_bench", "bench"),
    "sparse_ops": ("sparse_ops_bench", "bench"),
}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in ``path`` (a module of ``package``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the module's own package
                found.add((f"<{package}>", node.lineno))
            elif node.module:
                found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for top, line in imported_packages(path, layer):
            if top in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    assert violations(layer) == []


def test_the_check_sees_a_violation(tmp_path):
    """The rule can fail: a lazy import inside a function is found."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from sparse_ops import ops\n    return ops\n")
    assert ("sparse_ops", 2) in imported_packages(module, "kernels")
    relative = tmp_path / "rel.py"
    relative.write_text("from . import launch\n")
    assert imported_packages(relative, "kernels") == {("<kernels>", 1)}
