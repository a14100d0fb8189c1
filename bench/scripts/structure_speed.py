"""CPU time of the CPU-side work: structuring (regroup, refill), packing, conversion.

    python -m sparse_ops_bench.scripts.structure_speed [--repeats 3] \
        [--out bench/results/cpu/structure_speed.json]

Workloads: one 512×4608 conv mask (512×512×3×3) at 80% random sparsity, the hardest
case for the partitioner (no structure to find); and a whole CIFAR ResNet-18 ticket
at 80% global magnitude sparsity; packing a regroup-shaped 512×4608 layer into a
GroupPack; converting ``res56s`` (Refill ticket, channel mode) and ``res18`` (regroup-
shaped ticket, auto mode) end to end (trace, fold, layouts, packing). Reports the
median of ``--repeats`` wall-clock runs (time.perf_counter) with every sample, and the
environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparse_ops import Ticket, convert, imp, models, structure
from sparse_ops.checkpoint_io import write_text
from sparse_ops.packing import pack_groups
from sparse_ops.tables import format_table

from .. import tickets
from ..env import environment


def random_mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def resnet18_ticket(density: float = 0.2, seed: int = 0) -> Ticket:
    """res18 with global magnitude masks over its prunable convs (stem excluded)."""
    torch.manual_seed(seed)
    model = models.create("res18")
    names = imp.prunable(model)
    state = imp.capture_state(model)
    masks = imp.current_masks(model, names)
    rate = 1 - density
    masks = imp.magnitude_masks({n: state[n] for n in names}, masks, rate)
    return Ticket(masks, state, "res18")


WORKLOADS = (
    "regroup 512x4608 mask, 80% sparse",
    "regroup ResNet-18 ticket, 80% sparse",
    "refill ResNet-18 ticket (l1)",
    "inspect ResNet-18 ticket",
    "pack 512x4608 regroup layer into a GroupPack",
    "convert res56s refill ticket (channel)",
    "convert res18 regroup ticket (auto)",
)


def workloads() -> dict[str, Callable[[], object]]:
    """Workload name → a call doing it once (inputs are built here, not timed)."""
    layer = random_mask((512, 512, 3, 3), 0.2)
    ticket = resnet18_ticket()
    weight = torch.randn(512, 512, 3, 3)
    group_mask, layout = tickets.group_mask(tuple(weight.shape), 0.2, torch.Generator())
    res56s = models.create("res56s").eval()
    res56s_ticket = tickets.make_ticket(res56s, "refill", 0.5)
    res18 = models.create("res18").eval()
    res18_ticket = tickets.make_ticket(res18, "regroup", 0.8)
    calls = [
        lambda: structure.regroup_mask(layer),
        lambda: structure.regroup(ticket),
        lambda: structure.refill(ticket),
        lambda: ticket.summary(),
        lambda: pack_groups(weight, group_mask, layout, padding=1),
        lambda: convert(res56s, res56s_ticket, mode="channel"),
        lambda: convert(res18, res18_ticket, mode="auto"),
    ]
    return dict(zip(WORKLOADS, calls, strict=True))


def measure(repeats: int) -> list[dict]:
    rows = []
    for name, fn in workloads().items():
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        rows.append(
            {"workload": name, "median_s": statistics.median(samples), "samples_s": samples}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write results JSON here")
    args = parser.parse_args(argv)
    rows = measure(args.repeats)
    print(
        format_table(
            ["workload", "median s", "samples s"],
            [
                [
                    r["workload"],
                    f"{r['median_s']:.2f}",
                    " ".join(f"{s:.2f}" for s in r["samples_s"]),
                ]
                for r in rows
            ],
        )
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "structure_speed", "environment": environment(), "results": rows}
        write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
