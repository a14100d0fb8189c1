"""A short summary of a results folder, as ``bench/scripts/gpu_run.sh`` ends with.

    python -m sparse_ops_bench.scripts.summary DIR

One line per benchmark result in ``DIR`` (and ``DIR/graph``): for every preset result
(``<preset>_<dtype>.json``), ours' speedup over the baseline per model, method and
sparsity; for kernel floors, how many layer pairs meet their floor. Figures are read
from the files, never computed anew.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _floor_line(path: Path, result: dict) -> str:
    rows = result.get("rows", [])
    met = sum(bool(r.get("meets_floor")) for r in rows)
    return f"{path.name}: {met}/{len(rows)} layer pairs meet their floor"


def lines(folder: Path) -> list[str]:
    from ..report import summary_lines

    out = []
    for path in sorted([*folder.glob("*.json"), *folder.glob("graph/*.json")]):
        if path.name.endswith(".partial.json"):
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            out.append(f"{path.name}: unreadable ({e})")
            continue
        label = str(path.relative_to(folder))
        if path.name.startswith("kernel_floors"):
            out.append(_floor_line(path, result))
        elif "preset" in result and "rows" in result:
            out += [f"{label}: {line}" for line in summary_lines(result)] or [f"{label}: no rows"]
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for line in lines(Path(args[0])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
