"""Structure-LTH's refill (re-implemented in origin_formats.py) against ours, per layer.

    python tests/measure_origin_refill.py                 # stand-in tickets, rounds 1-4
    python tests/measure_origin_refill.py runs/x/round*.safetensors   # your tickets

For each ticket and criterion (``remain``, their default, and ``magnitude``, the
paper's ℓ1 of the trained weights) it prints how many layers the project's classifier
(:func:`sparse_ops.masks.mask_stats`) calls channel / group / ..., how many fully kept
channels theirs has relative to our K = ⌊d·Cout⌋, and how many layers keep partially
pruned rows. Used for the numbers in docs/STRUCTURE.md.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from origin_formats import structure_lth_refill_layer, structure_lth_run

from sparse_ops import Ticket, load_ticket
from sparse_ops.masks import mask_stats
from sparse_ops.structure import kept_channels, refill


def measure(ticket: Ticket, label: str) -> None:
    masked = ticket.masked_weights()
    for criterion in ("remain", "magnitude"):
        ours = refill(ticket, criterion="remain" if criterion == "remain" else "l1")
        g = torch.Generator().manual_seed(0)  # their random pick among tied channels
        kinds, extra, partial, ours_extra = Counter(), Counter(), 0, Counter()
        for name, m in ticket.masks.items():
            if criterion == "remain":
                score = m.flatten(1).sum(1).float()
            else:
                score = masked[name].flatten(1).abs().sum(1)
            theirs = structure_lth_refill_layer(m, score, 0.0, g)
            kinds[mask_stats(theirs).structure] += 1
            rows = theirs.flatten(1)
            k = kept_channels(int(m.sum()), m[0].numel(), m.shape[0])
            extra[int(rows.all(1).sum()) - k] += 1
            ours_extra[int(ours.masks[name].flatten(1).all(1).sum()) - k] += 1
            partial += bool((rows.any(1) & ~rows.all(1)).any())
        mine = Counter(mask_stats(ours.masks[n]).structure for n in ticket.masks)
        print(
            f"{label} (density {ticket.density:.4f}) {criterion}: {len(ticket.masks)} layers; "
            f"theirs {dict(kinds)}, full channels − K {dict(sorted(extra.items()))}, "
            f"layers with partial rows {partial}; ours {dict(mine)}, full channels − K "
            f"{dict(ours_extra)}"
        )


def main(paths: list[str]) -> None:
    if paths:
        for path in paths:
            measure(load_ticket(path), path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rounds in (1, 2, 3, 4):
            torch.manual_seed(1)
            structure_lth_run("res20s", rounds, Path(tmp) / str(rounds))
            path = Path(tmp) / str(rounds) / f"{rounds}checkpoint.pth.tar"
            measure(load_ticket(path, arch="res20s"), f"stand-in res20s round {rounds}")


if __name__ == "__main__":
    main(sys.argv[1:])
