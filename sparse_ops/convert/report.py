"""What a conversion did, layer by layer: :class:`ConversionReport` and its rendering.

``convert(..., return_report=True)`` returns one; the CLI prints :meth:`render`, and
jobs store :meth:`as_dict`. Totals are sums over the rows the passes recorded
(``context.LayerRow``): the report reads nothing back from the converted module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..tables import format_table
from .context import LayerRow
from .tune import tuning_table


@dataclass
class ConversionReport:
    mode: str
    on_unstructured: str
    traced: bool
    input_shape: tuple[int, ...]
    layers: list[LayerRow]
    notes: dict[str, Any] = field(default_factory=dict)
    channel_align: int = 1  # the CostModel's (docs/CONVERT.md, "Channel alignment")

    @property
    def flops_dense(self) -> int:
        return sum(r.flops_dense for r in self.layers)

    @property
    def flops_after(self) -> int:
        """The useful work: multiply-adds of kept weights on non-constant inputs, the same
        whatever the channel alignment."""
        return sum(r.flops_after for r in self.layers)

    @property
    def flops_kernel(self) -> int:
        """The work the units' GEMMs really do: ``flops_after`` plus zero-weight rows and
        columns (channel alignment) and group tiles' padding."""
        return sum(r.flops_after if r.flops_kernel is None else r.flops_kernel for r in self.layers)

    @property
    def params_stored(self) -> int:
        """Weights the units store, zero-weight padding included."""
        return sum(
            r.params_after if r.params_stored is None else r.params_stored for r in self.layers
        )

    @property
    def alignment(self) -> tuple[int, int]:
        """``(aligned, total)`` channel units: aligned ones read and write only 16-byte
        aligned rows, without gather or scatter (the GPU kernel's vector-copy path)."""
        units = [r for r in self.layers if "aligned" in r.detail]
        return sum(1 for r in units if r.detail["aligned"]), len(units)

    @property
    def params_dense(self) -> int:
        return sum(r.params_dense for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "on_unstructured": self.on_unstructured,
            "traced": self.traced,
            "input_shape": list(self.input_shape),
            "flops_dense": self.flops_dense,
            "flops_after": self.flops_after,
            "flops_ratio": self.flops_after / self.flops_dense if self.flops_dense else 1.0,
            "params_dense": self.params_dense,
            "params_after": self.params_after,
            "flops_kernel": self.flops_kernel,
            "params_stored": self.params_stored,
            "channel_align": self.channel_align,
            "aligned_channel_units": self.alignment[0],
            "channel_units": self.alignment[1],
            "notes": self.notes,
            "layers": [
                {**{k: getattr(r, k) for k in r.__dataclass_fields__ if k != "detail"}, **r.detail}
                for r in self.layers
            ],
        }

    def render(self) -> str:
        rows = [
            [
                r.name,
                r.structure,
                r.representation,
                r.flops_dense / 1e6,
                r.flops_after / 1e6,
                r.params_dense,
                r.params_after,
            ]
            for r in self.layers
        ]
        table = format_table(
            ["layer", "mask", "runs as", "MFLOPs before", "after", "params before", "after"],
            rows,
            align="lllrrrr",
        )
        ratio = self.flops_after / self.flops_dense if self.flops_dense else 1.0
        lines = [
            table,
            "",
            f"total: {self.flops_dense / 1e6:.1f} → {self.flops_after / 1e6:.1f} MFLOPs per "
            f"input of shape {tuple(self.input_shape[1:])} ({100 * ratio:.1f}% of dense); "
            f"{self.params_dense:,} → {self.params_after:,} conv/linear weights",
        ]
        if self.flops_kernel != self.flops_after:
            lines.append(
                f"GEMM work with zero-weight padding (alignment, tiles): "
                f"{self.flops_kernel / 1e6:.1f} MFLOPs, {self.params_stored:,} weights stored"
            )
        aligned, units = self.alignment
        if units:
            lines.append(
                f"aligned: {aligned} of {units} channel units read and write 16-byte aligned "
                f"rows without gather/scatter (channel_align={self.channel_align})"
            )
        counts = [f"{v} {k.replace('_', ' ')}" for k, v in self.notes.items() if isinstance(v, int)]
        if counts:
            lines.append("fused: " + ", ".join(counts))
        if not self.traced:
            lines.append(f"NOTE: {self.notes.get('fallback')}")
        if isinstance(self.notes.get("tuning"), dict):
            lines += ["", tuning_table(self.layers, self.notes["tuning"])]
        return "\n".join(lines)
