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
``imagefolder``
    ImageNet / Tiny-ImageNet as they ship: ``DIR/train/<class>/**/<image>`` (any
    depth, so Tiny-ImageNet's ``train/<wnid>/images/`` works) and either
    ``DIR/val/<class>/**/<image>`` (ImageNet after the usual valprep) or Tiny-ImageNet's
    ``DIR/val/images/`` + ``val_annotations.txt``. Classes are ``train/``'s folder names,
    sorted. ``val/`` is the test split; a seeded tenth of ``train/`` (at most 10,000
    images) is held out for best-epoch selection. Images are decoded per sample (Pillow),
    in DataLoader worker processes (``--workers``): training takes a random-resized crop
    (scale 0.08–1, aspect 3/4–4/3) and a horizontal flip, evaluation resizes the short
    side to ``image_size / 0.875`` (256 for 224) and takes the centre crop. Both are
    normalised with the ImageNet mean/std (the built-in trainer then sets a model's own
    ``normalize`` module to the identity so inputs are not normalised twice).

Images of the other datasets are float32 in [0, 1], NCHW; networks that normalise do it
themselves (Structure-LTH's ``normalize`` module), as in the origin code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SparseOpsError, listing

DATASETS = ("digits", "cifar10", "cifar100", "synthetic", "imagefolder")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(SparseOpsError):
    """A dataset that cannot be read as asked."""


@dataclass
class Split:
    images: torch.Tensor  # [N, 3, H, W] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    flip: bool  # horizontal flips are label-preserving (not for digits)
    pad: int  # random-crop padding for augmentation
    normalized: bool = False  # images come mean/std-normalised (imagefolder)

    @property
    def image_size(self) -> int:
        return self.train.image_size

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
    if name == "imagefolder":
        if root is None:
            raise DatasetError(
                "imagefolder reads DIR/train/<class>/... and DIR/val/...: pass DIR (--data-dir)"
            )
        return image_folder(root, image_size=image_size or 224, seed=seed)
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
    train = _read_records([root / f for f in train_files], label_bytes, classes)
    test = _read_records([root / f for f in test_files], label_bytes, classes)
    n_val = min(5000, len(train[1]) // 10)  # 45k / 5k on the real release
    tr, va = _split(*train, (len(train[1]) - n_val, n_val), seed)
    return Dataset(name, tr, va, Split(*test), classes, flip=True, pad=4)


def _read_records(
    paths: list[Path], label_bytes: int, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
        # A CIFAR-10 file read as CIFAR-100 (or the reverse) misaligns every record.
        bad = np.flatnonzero(rows[:, label_bytes - 1] >= classes)
        if bad.size:
            raise DatasetError(
                f"{path}: record {int(bad[0])} has label {int(rows[bad[0], label_bytes - 1])}"
                f", but there are {classes} classes; not this dataset's binary release"
            )
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


# ---------------------------------------------------------------------- image folders


def image_folder(root: str | os.PathLike, *, image_size: int = 224, seed: int = 0) -> Dataset:
    """ImageNet / Tiny-ImageNet folders (see the module docstring), decoded lazily."""
    root = Path(root)
    if image_size < 8:
        raise DatasetError(f"image_size must be ≥ 8 for imagefolder, got {image_size}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (--data-dir of imagefolder)")
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            found = sorted(p.name for p in root.iterdir())[:8]
            raise DatasetError(
                f"{d}: missing; imagefolder expects {root}/train/<class>/... and "
                f"{root}/val/... (found {found or 'nothing'} in {root})"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train_dir}: no class folders (expected train/<class>/<images>)")
    train_files, train_labels = _class_folders(train_dir, classes)
    val_files, val_labels = _val_split(val_dir, classes)
    n = len(train_files)
    if n < 2:
        raise DatasetError(f"{train_dir}: {n} image; need at least 2 (train and held-out val)")
    n_val = max(1, min(10_000, n // 10))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    labels = torch.tensor(train_labels, dtype=torch.int64)

    def part(idx: list[int]) -> FolderSplit:
        return FolderSplit([train_files[i] for i in idx], labels[idx], image_size)

    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    test = FolderSplit(val_files, torch.tensor(val_labels, dtype=torch.int64), image_size)
    return Dataset(
        "imagefolder",
        part(train_idx),
        part(val_idx),
        test,
        len(classes),
        flip=True,
        pad=0,
        normalized=True,
    )


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _class_folders(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _images_under(split_dir / name)
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise DatasetError(
            f"{split_dir}: class folders without images ({', '.join(IMAGE_SUFFIXES)}): "
            f"{listing(empty)}"
        )
    return files, labels


def _val_split(val_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    annotations = val_dir / "val_annotations.txt"
    folders = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and p.name != "images")
    if not folders and annotations.is_file():  # Tiny-ImageNet: val/images + annotations
        return _annotated_val(val_dir, annotations, classes)
    if not folders:
        raise DatasetError(
            f"{val_dir}: no class folders and no val_annotations.txt (expected "
            "val/<class>/<images>, or Tiny-ImageNet's val/images/ + val_annotations.txt)"
        )
    _check_same_classes(val_dir, set(folders), classes)
    return _class_folders(val_dir, classes)


def _annotated_val(val_dir: Path, annotations: Path, classes: list[str]):
    index = {name: i for i, name in enumerate(classes)}
    files, labels, named = [], [], set()
    for lineno, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(
                f"{annotations}:{lineno}: expected '<file>\\t<class>...', got {line[:60]!r}"
            )
        path = val_dir / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(f"{annotations}:{lineno}: {path} does not exist")
        named.add(fields[1])
        if fields[1] in index:
            files.append(path)
            labels.append(index[fields[1]])
    _check_same_classes(annotations, named, classes)
    return files, labels


def _check_same_classes(where: Path, found: set[str], classes: list[str]) -> None:
    unknown, missing = sorted(found - set(classes)), sorted(set(classes) - found)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"classes train/ lacks: {listing(unknown)}")
        if missing:
            parts.append(f"train/ classes it lacks: {listing(missing)}")
        raise DatasetError(f"{where}: val classes differ from train/'s ({'; '.join(parts)})")


class FolderSplit:
    """A split of image files decoded on demand.

    ``images[i]`` / ``images[a:b]`` decode with the evaluation transform (for code that
    wants a few images); the trainer uses :meth:`loader`, which decodes in DataLoader
    worker processes and, when augmenting, draws each sample's crop and flip from a
    generator seeded by (epoch seed, sample index): the same sample gets the same
    augmentation whichever rank or worker decodes it.
    """

    lazy = True

    def __init__(self, files: list[Path], labels: torch.Tensor, image_size: int):
        self.files = list(files)
        self.labels = labels
        self.image_size = int(image_size)
        self.resize = round(self.image_size / 0.875)  # 256 for 224, as ImageNet evaluates
        self.images = _LazyImages(self)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, augment: bool = False, seed: int = 0) -> torch.Tensor:
        """Image ``index`` as a normalised float32 [3, S, S] tensor."""
        image = _decode(self.files[index])
        size = self.image_size
        if augment:
            g = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
            box = _random_resized_box(image.size, g)
            image = image.resize((size, size), _bilinear(), box=box)
            if torch.rand((), generator=g) < 0.5:
                image = image.transpose(_flip())
        else:
            w, h = image.size
            scale = self.resize / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((rw, rh), _bilinear())
            left, top = (rw - size) // 2, (rh - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        x = pixels.permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (x - mean) / std

    def loader(self, batches, *, augment: bool = False, seed: int = 0, workers: int = 0):
        """Yield ``(images, labels)`` for each index tensor in ``batches``."""
        keys = [[(int(i), augment, seed) for i in b] for b in batches if len(b)]
        loader = torch.utils.data.DataLoader(
            _Items(self),
            batch_sampler=keys,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=False,
        )
        yield from loader


class _Items(torch.utils.data.Dataset):
    def __init__(self, split: FolderSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, augment, seed = key
        return self.split.load(index, augment, seed), self.split.labels[index]


class _LazyImages:
    """``split.images[...]``: decoded (evaluation transform) when indexed."""

    def __init__(self, split: FolderSplit):
        self.split = split

    @property
    def shape(self) -> tuple[int, int, int, int]:
        size = self.split.image_size
        return (len(self.split), 3, size, size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self.split.load(key)
        indices = range(len(self.split))[key] if isinstance(key, slice) else key
        return torch.stack([self.split.load(int(i)) for i in indices])


def _decode(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: cannot decode the image ({exc})") from None


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


def _flip():
    from PIL import Image

    return Image.Transpose.FLIP_LEFT_RIGHT


def _random_resized_box(
    size: tuple[int, int], g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): a random area share and
    log-uniform aspect ratio, 10 tries, then the centre crop at the nearest ratio."""
    import math

    w, h = size
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand((), generator=g)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            return left, top, left + cw, top + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch
