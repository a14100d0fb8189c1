"""The import rules of the three layers: data flows kernels ← sparse_ops ← bench.

``kernels/`` (installed as ``sparse_ops_kernels``) imports nothing from ``sparse_ops`` or
``bench/`` (``sparse_ops_bench``); ``sparse_ops`` never imports ``bench/``; inside
``bench/``, the library never imports its runnable one-offs (``bench/scripts/``,
``sparse_ops_bench.scripts``). Read from the source (every ``import`` and
``from … import``, at any depth, relative imports kept inside their package), so a lazy
import inside a function counts too.
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


def scripts_imports(path: Path) -> list[int]:
    """Lines of ``path`` (a module directly in ``bench/``) that import ``bench/scripts/``:
    ``sparse_ops_bench.scripts``, ``bench.scripts``, ``.scripts`` or ``from . import scripts``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:  # relative to bench/ itself
                names = [module] if module else [alias.name for alias in node.names]
                names = [f"sparse_ops_bench.{n}" for n in names]
            elif node.level:
                continue  # above bench/: never a script
            else:
                names = [module]
        else:
            continue
        if any(
            n.split(".")[:2] in (["sparse_ops_bench", "scripts"], ["bench", "scripts"])
            for n in names
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_bench_library_never_imports_its_scripts():
    library = sorted((ROOT / "bench").glob("*.py"))
    assert library and (ROOT / "bench" / "scripts" / "__init__.py").is_file()
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in library for line in scripts_imports(p)]
    assert bad == []


def test_the_scripts_check_sees_a_violation(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text(
        "def f():\n    from .scripts import kernel_static\n"
        "from . import scripts\nimport sparse_ops_bench.scripts.summary\n"
        "from . import harness\nfrom .static_cases import CASES\n"
    )
    assert scripts_imports(module) == [2, 3, 4]
