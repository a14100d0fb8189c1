"""CPU latency of a converted channel-pruned network vs the masked dense network.

    python -m sparse_ops_bench.scripts.convert_cpu [--arch res56s] [--batch 64] [--repeats 20]
                                        [--out bench/results/cpu/convert_res56s.json]

The ticket is a Refill ticket at 50% channel sparsity (masks drawn at density 0.5,
then refilled), the converter runs in channel mode, and both models are timed in the
same process on the same input (time.perf_counter, warm-up, median with p20/p80).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_ops import Ticket, convert, imp, masked_model, models, structure
from sparse_ops.checkpoint_io import write_text

from ..env import environment
from ..timing import time_cpu


def refill_ticket(arch: str, density: float = 0.5, seed: int = 0) -> tuple[torch.nn.Module, Ticket]:
    torch.manual_seed(seed)
    model = models.create(arch).eval()
    names = imp.prunable(model)
    state = imp.capture_state(model)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(state[n].shape, generator=g) < density for n in names}
    return model, structure.refill(Ticket(masks, state, arch), criterion="remain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="res56s")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model, ticket = refill_ticket(args.arch)
    reference = masked_model(model, ticket)
    # device="cpu": the layouts this CPU timing is about (the default targets the GPU,
    # whose channel alignment stores padding channels a CPU conv would only multiply).
    fast, report = convert(model, ticket, mode="channel", return_report=True, device="cpu")
    x = torch.randn(args.batch, *models.info(args.arch).input_size)
    with torch.no_grad():
        max_diff = float((fast(x) - reference(x)).abs().max())
    dense = time_cpu(lambda: reference(x), repeats=args.repeats)
    # The same masked network in channels-last memory: how much format alone buys.
    reference_cl = masked_model(model, ticket).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    dense_cl = time_cpu(lambda: reference_cl(x_cl), repeats=args.repeats)
    converted = time_cpu(lambda: fast(x), repeats=args.repeats)
    ratio = converted["median_ms"] / dense["median_ms"]
    result = {
        "benchmark": "convert_cpu",
        "arch": args.arch,
        "batch": args.batch,
        "input": list(models.info(args.arch).input_size),
        "ticket_density": ticket.density,
        "flops_ratio": report.flops_after / report.flops_dense,
        "max_abs_diff": max_diff,
        "masked_dense": dense,
        "masked_dense_channels_last": dense_cl,
        "converted": converted,
        "latency_ratio": ratio,
        "latency_ratio_vs_channels_last": converted["median_ms"] / dense_cl["median_ms"],
        "environment": environment(),
    }
    print(
        f"{args.arch} batch {args.batch}: masked dense {dense['median_ms']:.1f} ms "
        f"(channels-last {dense_cl['median_ms']:.1f} ms), converted "
        f"{converted['median_ms']:.1f} ms (×{ratio:.2f}; "
        f"×{result['latency_ratio_vs_channels_last']:.2f} vs channels-last); FLOPs "
        f"{100 * result['flops_ratio']:.1f}% of dense; max |diff| {max_diff:.2e}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
