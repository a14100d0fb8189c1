"""Per-layer reports of a structuring step (refill, regroup, ...)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..tables import format_table, shape_text


class DensityChange:
    """``density_before`` / ``density_after`` of a layer from its ``nnz_*`` and ``numel``."""

    nnz_before: int
    nnz_after: int
    numel: int

    @property
    def density_before(self) -> float:
        return self.nnz_before / self.numel if self.numel else 0.0

    @property
    def density_after(self) -> float:
        return self.nnz_after / self.numel if self.numel else 0.0


@dataclass
class LayerChange(DensityChange):
    """What one structuring step did to one layer's mask."""

    name: str
    shape: tuple[int, ...]
    status: str  # e.g. "refilled", "regrouped", "empty", "dense", "skipped: linear"
    nnz_before: int
    nnz_after: int
    dropped: int  # kept before, pruned after
    refilled: int  # pruned before, kept after
    numel: int
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["density_before"] = self.density_before
        d["density_after"] = self.density_after
        return d

    @classmethod
    def compare(
        cls, name: str, before: torch.Tensor, after: torch.Tensor, status: str, **detail: Any
    ) -> LayerChange:
        before, after = before.bool(), after.bool()
        return cls(
            name=name,
            shape=tuple(before.shape),
            status=status,
            nnz_before=int(before.sum()),
            nnz_after=int(after.sum()),
            dropped=int((before & ~after).sum()),
            refilled=int((~before & after).sum()),
            numel=before.numel(),
            detail=detail,
        )


def render_changes(changes: list[LayerChange], extra: tuple[str, ...] = ()) -> str:
    """A table of per-layer changes; ``extra`` names ``detail`` keys to show as columns."""
    headers = ["layer", "shape", "status", "density before", "after", "dropped", "refilled"]
    rows = []
    for c in changes:
        row = [
            c.name,
            shape_text(c.shape),
            c.status,
            c.density_before,
            c.density_after,
            c.dropped,
            c.refilled,
        ]
        row += [_text(c.detail.get(k, "")) for k in extra]
        rows.append(row)
    return format_table(headers + list(extra), rows, align="lllrrrr" + "l" * len(extra))


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    return str(value)
