"""Per-layer inspection of a ticket: what ``sparse-ops inspect`` reports."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from . import models
from .errors import printable
from .importers import is_conv_or_linear_weight
from .masks import STRUCTURES
from .tables import format_table, shape_text
from .tickets.fitting import maskable_weights
from .tickets.loading import load_ticket
from .tickets.ticket import Ticket


def unpruned_layers(ticket: Ticket) -> list[str]:
    """Conv/linear weights without a mask: from the architecture when known, else the weights."""
    if ticket.arch is not None and models.is_known(ticket.arch):
        candidates = list(maskable_weights(ticket))
    else:
        state = ticket.weights if ticket.weights is not None else ticket.rewind or {}
        candidates = [k for k, v in state.items() if is_conv_or_linear_weight(k, v)]
    return [k for k in candidates if k not in ticket.masks]


def inspect_report(source: str | os.PathLike | Ticket, arch: str | None = None) -> dict[str, Any]:
    """Load (unless given a Ticket) and describe a ticket as one JSON-ready dict.

    Keys: ``file``, ``source_format``, ``arch``, ``global_density``, ``global_sparsity``,
    ``masked_params``, ``kept_params``, ``has_weights``, ``has_rewind``, ``layers``
    (``name, shape, numel, nnz, density, empty_out, empty_in, structure, blocks,
    mean_block_rows``), ``structure_counts`` and ``unpruned_layers``.
    """
    if isinstance(source, Ticket):
        ticket = source.with_arch(arch) if arch else source
        file = ticket.meta.get("source")
    else:
        ticket = load_ticket(source, arch=arch)
        file = str(source)
    report = {"file": file, **ticket.summary()}
    counts = Counter(layer["structure"] for layer in report["layers"])
    report["structure_counts"] = {s: counts[s] for s in STRUCTURES if counts[s]}
    report["unpruned_layers"] = unpruned_layers(ticket)
    return report


def render_inspect(report: dict) -> str:
    """The human-readable form of :func:`inspect_report` (what ``sparse-ops inspect`` prints)."""
    carried = [s for s in ("weights", "rewind") if report[f"has_{s}"]]
    lines = [
        f"ticket   {printable(report['file'])}",
        f"format   {printable(report['source_format'])}; carries masks"
        + ("".join(f" + {s}" for s in carried)),
        f"arch     {printable(report['arch'] or '(not checked; pass --arch NAME)')}",
        "",
    ]
    rows = [
        [
            layer["name"],
            shape_text(layer["shape"]),
            layer["numel"],
            layer["density"],
            layer["empty_out"],
            layer["empty_in"],
            layer["structure"],
        ]
        for layer in report["layers"]
    ]
    if rows:
        headers = ["layer", "shape", "weights", "density", "empty out", "empty in", "structure"]
        lines.append(format_table(headers, rows, align="llrrrrl"))
        lines.append("")
    n = len(report["layers"])
    if n:
        lines.append(
            f"global density {report['global_density']:.4f} "
            f"(sparsity {100 * report['global_sparsity']:.2f}%) over {n} masked layers: "
            f"{report['kept_params']:,} of {report['masked_params']:,} weights kept"
        )
        counts = ", ".join(f"{c} {s}" for s, c in report["structure_counts"].items())
        lines.append(f"structure: {counts}")
    else:
        lines.append("no masked layers: the checkpoint is dense")
    if report["unpruned_layers"]:
        names = ", ".join(report["unpruned_layers"])
        lines.append(f"unpruned conv/linear weights: {printable(names)}")
    return "\n".join(lines)
