"""docs/ARCHITECTURE.md names every module: the map cannot silently fall behind the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("kernels", "sparse_ops", "bench")


def _section_rows(doc: str, folder: str) -> list[str]:
    start = doc.index(f"### `{folder}/`")
    end = doc.find("\n### ", start + 1)
    return [line for line in doc[start:end].splitlines() if line.startswith("| `")]


def _listed(relative: str, rows: list[str]) -> bool:
    """``relative`` (``nn/channel.py``) is named by a row, or its folder's row names it."""
    if any(f"`{relative}`" in row for row in rows):
        return True
    folder, stem = relative.rpartition("/")[0], Path(relative).stem
    return bool(folder) and any(
        f"`{folder}/`" in row and re.search(rf"`{stem}`|\b{stem}\b", row) for row in rows
    )


def test_every_module_is_in_the_architecture_map():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = []
    for folder in SECTIONS:
        rows = _section_rows(doc, folder)
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py") and path.parent.name != "convert":
                continue
            relative = path.relative_to(ROOT / folder).as_posix()
            if not _listed(relative, rows):
                missing.append(f"{folder}/{relative}")
    assert not missing, f"not in docs/ARCHITECTURE.md: {missing}"
