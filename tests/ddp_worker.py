"""One rank of the data-parallel IMP test (tests/test_distributed.py starts it with
``python -m torch.distributed.run``; it also runs as a single process, world size 1).

Writes ``{out}/rank{r}.pt``: the masks, trained weights and accuracy of every round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from sparse_ops import data, distributed, imp
from sparse_ops.data import Split
from sparse_ops.training import TrainConfig, Trainer

TRAIN_SAMPLES = 256  # divisible by the world sizes the test uses: no sample left out


class TwoConvNet(nn.Module):
    """No BatchNorm: BN normalises per shard, so only a BN-free net is the same maths at
    2 ranks × b and 1 process × 2b."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).flatten(1))


def dataset():
    ds = data.load("synthetic", image_size=8, seed=0)
    ds.train = Split(ds.train.images[:TRAIN_SAMPLES], ds.train.labels[:TRAIN_SAMPLES])
    return ds


def run(out: Path, batch_size: int, rounds: int, fail_rank: int | None) -> dict:
    device = distributed.init_from_env("cpu")
    torch.manual_seed(0)
    model = TwoConvNet()
    trainer = Trainer(
        dataset(), TrainConfig(epochs=1, batch_size=batch_size, lr=0.05), device=device
    )

    def train_fn(m, ctx):
        if ctx.round == 1 and distributed.rank() == fail_rank:
            raise data.DatasetError("simulated failure of one rank")
        trainer.fit(m, ctx)

    record = {"rounds": []}
    for ticket in imp.run(
        model, rounds, train_fn, trainer.accuracy, rate=0.5, example_input=torch.zeros(1, 3, 8, 8)
    ):
        record["rounds"].append(
            {"masks": ticket.masks, "weights": ticket.weights, "accuracy": ticket.meta["accuracy"]}
        )
    record["world_size"] = distributed.world_size()
    record["rank"] = distributed.rank()
    # The cross-rank guard: silent on equal tensors, raises on every rank when one differs.
    last = record["rounds"][-1]["masks"]
    distributed.check_identical(last, "masks")
    changed = {k: v.clone() for k, v in last.items()}
    if distributed.rank() == 1:
        changed["conv.weight"].view(-1)[0] ^= True
    try:
        distributed.check_identical(changed, "test masks")
        record["guard"] = ""
    except distributed.DistributedError as exc:
        record["guard"] = str(exc)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{record['rank']}.pt")
    distributed.shutdown()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fail-rank", type=int)
    args = parser.parse_args(argv)
    run(args.out, args.batch_size, args.rounds, args.fail_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
