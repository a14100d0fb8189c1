"""The built-in trainer: SGD with momentum, a step schedule, best-val selection.

Augmentation is a random crop from a zero-padded image (and a horizontal flip where
that preserves labels), as in the Structure-LTH CIFAR recipe. Training is seeded:
the same config and seed give the same batches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    ):
        self.data = data
        self.config = config or TrainConfig()
        self.device = torch.device(device)
        self.progress = progress or Progress(enabled=False)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Top-1 accuracy in percent on ``split`` (eval mode)."""
        part: Split = getattr(self.data, split)
        was_training = model.training
        model.eval()
        correct = 0
        for start in range(0, len(part), 512):
            x = part.images[start : start + 512].to(self.device)
            y = part.labels[start : start + 512].to(self.device)
            correct += int((model(x).argmax(dim=1) == y).sum())
        model.train(was_training)
        return 100.0 * correct / len(part)

    # -------------------------------------------------------------- training
    def _batches(self, epoch: int, round_index: int):
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_index * 1009 + epoch)
        train = self.data.train
        order = torch.randperm(len(train), generator=g)
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            yield self._augment(train.images[idx], g), train.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = self.data.pad
        n, _, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                     rows, cols]  # fmt: skip
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
                loss = F.cross_entropy(model(x), y)
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
