"""Datasets for the built-in trainer. Nothing is ever downloaded.

``digits``
    The 8×8 handwritten digits that ship inside scikit-learn (1,797 images, 10
    classes): the embedded default. Pixels are scaled to [0, 1], resized to
    ``image_size`` (bilinear) and repeated over 3 channels, so CIFAR networks take
    them unchanged. Fixed split: 1,257 train / 180 val / 360 test.
``cifar10`` / ``cifar100``
    The official *binary* releases, read from a local directory (``--data-dir``):
    ``data_batch_1.bin`` … ``data_batch_5.bin`` + ``test_batch.bin`` (CIFAR-10, records
    of 1 label byte + 3,072 pixel bytes), or ``train.bin`` + ``test.bin`` (CIFAR-100,
    2 label bytes — coarse, fine — + 3,072). The python (pickle) release is not read.
    45,000 / 5,000 train / val split of the training set (a tenth, for smaller copies).
``synthetic``
    Class templates plus noise, generated from a seed: smoke tests, no files.

Images are float32 in [0, 1], NCHW; networks that normalise do it themselves
(Structure-LTH's ``normalize`` module), as in the origin code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SparseOpsError

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


class DatasetError(SparseOpsError):
    """A dataset that cannot be read as asked."""


@dataclass
class Split:
    images: torch.Tensor  # [N, 3, H, W] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    flip: bool  # horizontal flips are label-preserving (not for digits)
    pad: int  # random-crop padding for augmentation

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} "
            f"test, {self.num_classes} classes, {self.image_size}×{self.image_size}"
        )


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load dataset ``name`` (see the module docstring)."""
    if name == "digits":
        return _digits(image_size or 32, seed)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DatasetError(
                f"{name} is read from a local copy of the binary release: pass its directory "
                "(--data-dir); nothing is downloaded"
            )
        if image_size not in (None, 32):
            raise DatasetError(f"{name} images are 32×32; image_size={image_size} is not supported")
        return _cifar(name, Path(root), seed)
    if name == "synthetic":
        return _synthetic(image_size or 32, seed)
    raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def _split(images: torch.Tensor, labels: torch.Tensor, sizes: tuple[int, ...], seed: int):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        idx = order[start : start + size]
        out.append(Split(images[idx].contiguous(), labels[idx].contiguous()))
        start += size
    return out


def _digits(image_size: int, seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError(f"the digits dataset needs scikit-learn: {exc}") from None
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8]
    if image_size != 8:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    images = images.clamp_(0, 1).expand(-1, 3, -1, -1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, val, test = _split(images, labels, (1257, 180, 360), seed)
    return Dataset("digits", train, val, test, 10, flip=False, pad=max(1, image_size // 16))


_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 10),
    "cifar100": (["train.bin"], ["test.bin"], 2, 100),
}
_CIFAR_SUBDIR = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}


def _cifar(name: str, root: Path, seed: int) -> Dataset:
    train_files, test_files, label_bytes, classes = _CIFAR_FILES[name]
    if not (root / train_files[0]).is_file() and (root / _CIFAR_SUBDIR[name]).is_dir():
        root = root / _CIFAR_SUBDIR[name]
    expected = train_files + test_files
    missing = [f for f in expected if not (root / f).is_file()]
    if missing:
        present = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
        raise DatasetError(
            f"{root}: not the {name} binary release: missing {', '.join(missing)} "
            f"(expected {', '.join(expected)}; found {present or 'nothing'}). "
            "Use the 'binary version' from the CIFAR page, not the python (pickle) one"
        )
    train = _read_records([root / f for f in train_files], label_bytes)
    test = _read_records([root / f for f in test_files], label_bytes)
    n_val = min(5000, len(train[1]) // 10)  # 45k / 5k on the real release
    tr, va = _split(*train, (len(train[1]) - n_val, n_val), seed)
    return Dataset(name, tr, va, Split(*test), classes, flip=True, pad=4)


def _read_records(paths: list[Path], label_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    record = label_bytes + 3072
    images, labels = [], []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DatasetError(
                f"{path}: {raw.size} bytes is not a whole number of {record}-byte records; "
                "truncated, or not a CIFAR binary file"
            )
        rows = raw.reshape(-1, record)
        labels.append(torch.from_numpy(rows[:, label_bytes - 1].astype(np.int64)))
        pixels = rows[:, label_bytes:].reshape(-1, 3, 32, 32)
        images.append(torch.from_numpy(pixels.astype(np.float32) / 255.0))
    return torch.cat(images), torch.cat(labels)


def _synthetic(image_size: int, seed: int, classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    n = 2048 + 256 + 512
    labels = torch.arange(n) % classes
    noise = 0.25 * torch.randn(n, 3, image_size, image_size, generator=g)
    images = (templates[labels] + noise).clamp_(0, 1)
    train, val, test = _split(images, labels, (2048, 256, 512), seed)
    return Dataset("synthetic", train, val, test, classes, flip=True, pad=max(1, image_size // 8))
