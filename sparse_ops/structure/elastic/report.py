"""What an elastic transform did: per stage and per masked layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...tables import format_table, shape_text
from ..report import DensityChange


@dataclass(frozen=True)
class LayerCopy(DensityChange):
    """Where one masked layer of the target ticket came from."""

    name: str
    source: str
    shape: tuple[int, ...]
    stage: int | None  # None: stem / classifier
    block: int | None
    source_block: int | None
    role: str  # "fixed", "first block", "copy", "extra copy", "extra copy, shuffled"
    nnz_before: int  # in the source layer
    nnz_after: int
    numel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "shape": list(self.shape),
            "stage": self.stage,
            "block": self.block,
            "source_block": self.source_block,
            "role": self.role,
            "nnz_before": self.nnz_before,
            "nnz_after": self.nnz_after,
            "numel": self.numel,
            "density_before": self.density_before,
            "density_after": self.density_after,
        }


@dataclass(frozen=True)
class StageChange:
    """One stage: depths, mapping, the source block of each target block, density."""

    stage: int
    source_blocks: int
    target_blocks: int
    mapping: str
    sources: tuple[int, ...]  # sources[t]: the source block of target block t
    extras: tuple[int, ...]  # target blocks that are extra copies
    density_before: float | None  # over the stage's masked layers; None: nothing masked
    density_after: float | None

    @property
    def kind(self) -> str:
        if self.target_blocks == self.source_blocks:
            return "same depth"
        return "stretch" if self.target_blocks > self.source_blocks else "squeeze"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "kind": self.kind,
            "source_blocks": self.source_blocks,
            "target_blocks": self.target_blocks,
            "mapping": self.mapping,
            "sources": list(self.sources),
            "extras": list(self.extras),
            "density_before": self.density_before,
            "density_after": self.density_after,
        }


@dataclass(frozen=True)
class ElasticReport:
    """What :func:`transform` did, per stage and per masked layer."""

    source_arch: str
    target_arch: str
    strategy: str  # the strategy name, or "explicit"
    random_extra: bool
    seed: int
    density_before: float
    density_after: float
    stages: tuple[StageChange, ...]
    layers: tuple[LayerCopy, ...] = field(repr=False)

    @property
    def mapping(self) -> str:
        """All stages' mappings in open_lth syntax (``|`` between stages)."""
        return "|".join(s.mapping for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "elastic",
            "source_arch": self.source_arch,
            "target_arch": self.target_arch,
            "strategy": self.strategy,
            "mapping": [s.mapping for s in self.stages],
            "random_extra": self.random_extra,
            "seed": self.seed,
            "density_before": self.density_before,
            "density_after": self.density_after,
            "stages": [s.to_dict() for s in self.stages],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def render(self, layers: bool = True) -> str:
        """Stage table, then (with ``layers``) the per-layer table, as plain text."""
        head = (
            f"elastic {self.source_arch} → {self.target_arch} ({self.strategy}"
            + (f", random extra copies, seed {self.seed}" if self.random_extra else "")
            + f"): density {self.density_before:.4f} → {self.density_after:.4f}"
        )
        rows = [
            [
                s.stage,
                s.kind,
                f"{s.source_blocks} → {s.target_blocks}",
                s.mapping,
                " ".join(map(str, s.sources)),
                _density(s.density_before),
                _density(s.density_after),
            ]
            for s in self.stages
        ]
        headers = [
            "stage",
            "kind",
            "blocks",
            "mapping",
            "source of each block",
            "density before",
            "after",
        ]
        out = [head, "", format_table(headers, rows, align="rllllrr")]
        if layers:
            rows = [
                [c.name, shape_text(c.shape), c.source, c.role, c.density_before, c.density_after]
                for c in self.layers
            ]
            headers = ["layer", "shape", "from", "role", "density before", "after"]
            out += ["", format_table(headers, rows, align="llllrr")]
        return "\n".join(out)


def _density(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
