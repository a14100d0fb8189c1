"""The built-in trainer: SGD with momentum, a step schedule, best-val selection.

Augmentation is a random crop from a zero-padded image (and a horizontal flip where
that preserves labels), as in the Structure-LTH CIFAR recipe; image-folder datasets
decode and augment per sample in DataLoader worker processes (random-resized crop and
flip, see :mod:`sparse_ops.data`). Training is seeded: the same config and seed give
the same batches.

Inside a ``torch.distributed`` process group (``torchrun``) :meth:`Trainer.fit` trains
the model wrapped in ``DistributedDataParallel``. ``batch_size`` is per process: each
step takes the next ``batch_size × world_size`` samples of the epoch's permutation
(the same on every rank) and gives each rank one contiguous shard, so the samples and
their augmentation match one process at the global batch size. Evaluation is sharded
and summed over ranks; BatchNorm statistics are rank 0's after every epoch (DDP's
convention), so every rank keeps the same best epoch. See :mod:`sparse_ops.distributed`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Dataset, Split
from .errors import SparseOpsError
from .progress import Progress


class TrainingError(SparseOpsError):
    """A training configuration that cannot work."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)  # LR × gamma at these fractions of epochs
    gamma: float = 0.1
    rewind_epoch: int = 0  # round 0: capture the rewind point after this many epochs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch_size must be ≥ 1")
        if not 0 <= self.rewind_epoch <= self.epochs:
            raise TrainingError(f"rewind_epoch must be in [0, epochs], got {self.rewind_epoch}")
        if self.lr <= 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")

    def as_dict(self) -> dict:
        return asdict(self)


class Trainer:
    def __init__(
        self,
        data: Dataset,
        config: TrainConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        progress: Progress | None = None,
        workers: int = 0,
    ):
        if workers < 0:
            raise TrainingError(f"workers must be ≥ 0, got {workers}")
        self.data = data
        self.config = config or TrainConfig()
        self.device = torch.device(device)
        self.progress = progress or Progress(enabled=False)
        self.workers = workers  # DataLoader processes for datasets decoded per sample

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Top-1 accuracy in percent on ``split`` (eval mode)."""
        part: Split = getattr(self.data, split)
        was_training = model.training
        model.eval()
        correct = 0
        # Each rank scores its share; the counts are summed, so all ranks agree.
        mine = distributed.shard(torch.arange(len(part)))
        for x, y in self._eval_batches(part, mine, 512):
            x, y = x.to(self.device), y.to(self.device)
            correct += int((model(x).argmax(dim=1) == y).sum())
        model.train(was_training)
        correct, total = distributed.all_sum([correct, len(mine)])
        return 100.0 * correct / total

    def _eval_batches(self, part, indices: torch.Tensor, size: int):
        if getattr(part, "lazy", False):  # decoded per sample: worker processes
            yield from part.loader(indices.split(size), workers=self.workers)
            return
        for start in range(0, len(indices), size):
            idx = indices[start : start + size]
            yield part.images[idx], part.labels[idx]

    # -------------------------------------------------------------- training
    def _batches(self, epoch: int, round_index: int):
        cfg = self.config
        seed = cfg.seed * 1_000_003 + round_index * 1009 + epoch
        g = torch.Generator().manual_seed(seed)
        train = self.data.train
        order = torch.randperm(len(train), generator=g)
        # Equal shards on every rank (DDP's gradient mean is then the global batch mean).
        order = order[: distributed.usable_length(len(order))]
        step = cfg.batch_size * distributed.world_size()
        batches = [order[start : start + step] for start in range(0, len(order), step)]
        if getattr(train, "lazy", False):
            shards = [b[distributed.shard(torch.arange(len(b)))] for b in batches]
            yield from train.loader(shards, augment=True, seed=seed, workers=self.workers)
            return
        for idx in batches:
            # The whole global batch is augmented, drawing from ``g`` exactly as one
            # process at the global batch size would; each rank then keeps its shard.
            mine = distributed.shard(torch.arange(len(idx)))
            yield self._augment(train.images[idx], g)[mine], train.labels[idx][mine]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = self.data.pad
        n, _, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        out = padded[
            torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols
        ]
        if self.data.flip:
            flip = torch.rand(n, generator=g) < 0.5
            out[flip] = out[flip].flip(-1)
        return out

    def fit(self, model: nn.Module, ctx=None) -> dict:
        """Train ``model`` in place; keep the weights of the best validation epoch.

        ``ctx`` is an :class:`sparse_ops.imp.RoundContext` when called from IMP: in
        round 0 the rewind point is captured after ``rewind_epoch`` epochs.
        """
        cfg = self.config
        round_index = ctx.round if ctx is not None else 0
        model.to(self.device).train()
        net = model
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.milestones})
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.gamma)
        if ctx is not None and round_index == 0 and cfg.rewind_epoch == 0:
            ctx.capture_rewind()
        best = (-1.0, 0, None)
        start = time.perf_counter()
        label = f"round {round_index}" if ctx is not None else "training"
        for epoch in range(1, cfg.epochs + 1):
            total, seen = 0.0, 0
            for x, y in self._batches(epoch, round_index):
                x, y = x.to(self.device), y.to(self.device)
                loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                seen += len(y)
                self.progress.update(
                    f"{label}: epoch {epoch}/{cfg.epochs} loss {total / seen:.3f} "
                    f"({time.perf_counter() - start:.0f}s)"
                )
            schedule.step()
            total, seen = distributed.all_sum([total, seen])  # every rank sees the same
            # BN statistics: rank 0's everywhere, so evaluation and best state agree.
            distributed.broadcast_module_state(model, buffers_only=True)
            if not torch.isfinite(torch.tensor(total)):
                raise TrainingError(f"{label}: loss diverged at epoch {epoch}; lower the lr")
            if ctx is not None and round_index == 0 and epoch == cfg.rewind_epoch:
                ctx.capture_rewind()
            val = self.accuracy(model, "val")
            if val > best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (val, epoch, state)
            self.progress.update(
                f"{label}: epoch {epoch}/{cfg.epochs} loss {total / seen:.3f} val {val:.2f}% "
                f"({time.perf_counter() - start:.0f}s)"
            )
        model.load_state_dict(best[2])
        return {
            "best_val": best[0],
            "best_epoch": best[1],
            "epochs": cfg.epochs,
            "seconds": time.perf_counter() - start,
        }
