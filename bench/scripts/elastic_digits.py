"""Elastic ticket on real data: stretch a refill ticket to a deeper net and retrain it.

    python -m sparse_ops_bench.scripts.elastic_digits [--src res20s] [--dst res32s] \
        [--rounds 3] [--epochs 20]
        [--lr 0.02] [--batch-size 64] [--image-size 16]
        [--out docs/results/elastic_digits_res20s_res32s.json]

1. IMP with refill on ``--src`` on the embedded digits (``sparse_ops.jobs.prune_job``,
   rewinding to the initialisation), ``--rounds`` rounds;
2. :func:`sparse_ops.structure.transform` of the last ticket to ``--dst`` (``--mapping``,
   default interpolate): masks and rewind weights copied block by block;
3. the stretched ticket rewound (its copied rewind weights) and retrained under its
   masks; the same with ``random_extra`` (extra copies' masks shuffled: the paper's
   control);
4. the dense ``--dst`` network trained from scratch with the same budget.

Every network gets the same trainer, epochs and seed; test accuracy at the best
validation epoch. Writes one JSON with every number and the environment.

The defaults fit a 2-core CPU in a few minutes. The digits are 8×8 images, so 16×16
loses nothing against 32×32. lr 0.02 with batches of 64: at the trainer's default lr 0.1
(batches of 128, so 10 steps per epoch) the dense ``res32s`` did not converge within
10–20 epochs (see docs/ELASTIC.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sparse_ops import Ticket, load_ticket, models
from sparse_ops import data as datasets
from sparse_ops.checkpoint_io import write_text
from sparse_ops.jobs import prune_job
from sparse_ops.progress import Progress
from sparse_ops.structure import transform
from sparse_ops.tables import format_table
from sparse_ops.training import TrainConfig, Trainer

from ..env import environment


def train_ticket(ticket: Ticket, trainer: Trainer) -> dict[str, Any]:
    """Rewind ``ticket``'s network to its rewind weights and train it under its masks."""
    model = ticket.create_model()
    ticket.apply(model, "rewind")  # prune hooks keep pruned weights at zero while training
    fit = trainer.fit(model)
    return {"density": ticket.density, "accuracy": trainer.accuracy(model), **fit}


def train_dense(arch: str, trainer: Trainer, num_classes: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = models.create(arch, num_classes)
    fit = trainer.fit(model)
    return {"density": 1.0, "accuracy": trainer.accuracy(model), **fit}


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = Progress()
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        imp = prune_job(
            args.src,
            tmp,
            data="digits",
            image_size=args.image_size,
            rounds=args.rounds,
            rate=args.rate,
            post="refill",
            train=config,
            progress=progress,
        )
        ticket = load_ticket(imp["final"]["ticket"])
    dataset = datasets.load("digits", image_size=args.image_size, seed=config.seed)
    trainer = Trainer(dataset, config, progress=progress)
    results: dict[str, Any] = {}
    for label, random_extra in (("stretched", False), ("stretched, random extra", True)):
        stretched = transform(
            ticket, args.src, args.dst, args.mapping, random_extra=random_extra, seed=args.seed
        )
        results[label] = train_ticket(stretched, trainer)
        progress.line(f"{label} {args.dst}: {results[label]['accuracy']:.2f}%")
    results["dense"] = train_dense(args.dst, trainer, dataset.num_classes, args.seed)
    progress.line(f"dense {args.dst}: {results['dense']['accuracy']:.2f}%")
    gap = results["dense"]["accuracy"] - results["stretched"]["accuracy"]
    return {
        "data": "digits",
        "src": args.src,
        "dst": args.dst,
        "mapping": stretched.meta["elastic"][-1]["mapping"],
        "imp": {
            "rounds": args.rounds,
            "rate": args.rate,
            "post": "refill",
            "dense_accuracy": imp["dense_accuracy"],
            "ticket_accuracy": imp["final"]["accuracy"],
            "ticket_density": imp["final"]["density"],
        },
        "train": config.as_dict(),
        "image_size": args.image_size,
        "target": results,
        "dense_minus_stretched": gap,
        "seconds": time.perf_counter() - start,
        "environment": environment(),
    }


def render(summary: dict[str, Any]) -> str:
    imp = summary["imp"]
    rows = [
        [f"{summary['src']} dense", 1.0, imp["dense_accuracy"]],
        [f"{summary['src']} refill ticket (IMP)", imp["ticket_density"], imp["ticket_accuracy"]],
    ]
    rows += [
        [f"{summary['dst']} {label}", r["density"], r["accuracy"]]
        for label, r in summary["target"].items()
    ]
    table = format_table(["network", "density", "test acc %"], rows, align="lrr")
    return (
        f"{table}\n\ndense {summary['dst']} − stretched ticket: "
        f"{summary['dense_minus_stretched']:+.2f} points; {summary['seconds']:.0f} s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default="res20s")
    parser.add_argument("--dst", default="res32s")
    parser.add_argument("--mapping", default="interpolate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    args = parser.parse_args()
    summary = run(args)
    print(render(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps(summary, indent=2) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
