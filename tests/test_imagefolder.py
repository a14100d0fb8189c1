"""``--data imagefolder`` on tiny generated ImageNet / Tiny-ImageNet trees, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_ops import data
from sparse_ops.cli import main
from sparse_ops.tickets import load_ticket
from sparse_ops.training import TrainConfig, Trainer

CLASSES = ("n01", "n02", "n03")
COLOURS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def _image(path, colour, size=(40, 30), noise=0, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), dtype=np.int16)
    pixels[:] = colour
    pixels += rng.integers(-noise, noise + 1, pixels.shape) if noise else 0
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def imagenet_tree(root, per_class=6, val_per_class=2, noise=20):
    """train/<class>/*.{png,JPEG} and val/<class>/*, odd sizes and aspect ratios."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            suffix = ".JPEG" if i % 2 else ".png"
            size = (40 + 3 * i, 30 + 5 * c)
            _image(root / "train" / name / f"{name}_{i}{suffix}", COLOURS[name], size, noise, i)
        for i in range(val_per_class):
            _image(root / "val" / name / f"val_{c}_{i}.png", COLOURS[name], (33, 47), noise, i)
    return root


def tiny_imagenet_tree(root, per_class=4):
    """Tiny-ImageNet as shipped: train/<wnid>/images/, val/images/ + val_annotations.txt."""
    lines = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _image(root / "train" / name / "images" / f"{name}_{i}.JPEG", COLOURS[name], (64, 64))
        (root / "train" / name / f"{name}_boxes.txt").write_text("")
        for i in range(2):
            file = f"val_{c * 2 + i}.JPEG"
            _image(root / "val" / "images" / file, COLOURS[name], (64, 64))
            lines.append(f"{file}\t{name}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _annotated_class(file):
    lines = (file.parents[1] / "val_annotations.txt").read_text().splitlines()
    return CLASSES.index(dict(line.split("\t")[:2] for line in lines)[file.name])


def _expected(colour):
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    return (torch.tensor(colour) / 255 - mean) / std


@pytest.mark.parametrize(("layout", "n_train", "n_test"), [("imagenet", 18, 6), ("tiny", 12, 6)])
def test_layouts_classes_splits_and_normalisation(tmp_path, layout, n_train, n_test):
    if layout == "imagenet":
        imagenet_tree(tmp_path, noise=0)
    else:
        tiny_imagenet_tree(tmp_path)
    ds = data.load("imagefolder", tmp_path, image_size=16, seed=0)
    assert ds.num_classes == 3 and ds.normalized and ds.image_size == 16
    assert len(ds.train) + len(ds.val) == n_train and len(ds.val) == max(1, n_train // 10)
    assert len(ds.test) == n_test
    assert sorted(ds.test.labels.tolist()) == sorted([0, 1, 2] * (n_test // 3))
    x = ds.test.images[:]
    assert x.shape == (n_test, 3, 16, 16) and x.dtype == torch.float32
    for image, file in zip(x, ds.test.files, strict=True):
        # A flat colour survives resize and crop: only the normalisation changes it. The
        # colour is the decoded one (JPEG shifts flat colours by a level or two).
        colour = np.asarray(Image.open(file).convert("RGB"))[0, 0].tolist()
        want = _expected(colour)[:, None, None].expand(3, 16, 16)
        torch.testing.assert_close(image, want, atol=1e-5, rtol=0)
    assert ds.test.labels.tolist() == [
        CLASSES.index(f.parent.name) if layout == "imagenet" else _annotated_class(f)
        for f in ds.test.files
    ]


def test_centre_crop_of_the_resized_short_side(tmp_path):
    # 40×20: left half red, right half blue; size 8 → short side 9 (8 / 0.875), 18×9,
    # then the centre 8×8 (columns 5..12): left 4 columns red, right 4 blue.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    for split in ("train", "val"):
        for i in range(2):
            path = tmp_path / split / "a" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    ds = data.load("imagefolder", tmp_path, image_size=8)
    x = ds.test.images[0]
    red, blue = _expected((255, 0, 0)), _expected((0, 0, 255))
    torch.testing.assert_close(x[:, :, :3], red[:, None, None].expand(3, 8, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, :, 5:], blue[:, None, None].expand(3, 8, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("index", [0, 3, 7])
def test_train_augmentation_is_seeded_per_sample(tmp_path, index):
    ds = data.load("imagefolder", imagenet_tree(tmp_path), image_size=16)
    a = ds.train.load(index, augment=True, seed=5)
    torch.testing.assert_close(a, ds.train.load(index, augment=True, seed=5), rtol=0, atol=0)
    assert a.shape == (3, 16, 16)
    others = [ds.train.load(index, augment=True, seed=s) for s in range(6, 12)]
    assert any(not torch.equal(a, o) for o in others)  # crops / flips vary with the seed
    assert not torch.equal(a, ds.train.load(index))  # and differ from the eval transform


@pytest.mark.parametrize("size", [(64, 64), (200, 20), (20, 200)])
def test_random_resized_boxes_stay_inside(size):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = data._random_resized_box(size, g)
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
        share = (right - left) * (bottom - top) / (size[0] * size[1])
        assert 0.05 <= share <= 1.0


def test_workers_do_not_change_the_batches(tmp_path):
    ds = data.load("imagefolder", imagenet_tree(tmp_path), image_size=16)
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3)
        )
        trainer = Trainer(ds, TrainConfig(epochs=2, batch_size=4, lr=0.05), workers=workers)
        result = trainer.fit(model)
        states.append((model.state_dict(), result["best_val"], trainer.accuracy(model)))
    (a, val_a, test_a), (b, val_b, test_b) = states
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert (val_a, test_a) == (val_b, test_b)


def test_cli_prune_on_an_image_folder(tmp_path, capsys):
    root = imagenet_tree(tmp_path / "tree")
    out = tmp_path / "out"
    argv = [
        "prune",
        "--arch",
        "res20s",
        "--data",
        "imagefolder",
        "--data-dir",
        str(root),
        "--image-size",
        "16",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"] == "imagefolder" and len(summary["rounds"]) == 2
    ticket = load_ticket(tmp_path / "out" / "round1.safetensors")
    # inputs arrive ImageNet-normalised, so the model's own normalize is the identity
    torch.testing.assert_close(ticket.weights["normalize.mean"], torch.zeros(3))
    torch.testing.assert_close(ticket.weights["normalize.std"], torch.ones(3))
    assert ticket.weights["fc.weight"].shape[0] == 3


# ---------------------------------------------------------------- errors


def _break(root, how):
    if how == "no root":
        return root / "missing"
    if how == "no val":
        imagenet_tree(root)
        for p in sorted((root / "val").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "val").rmdir()
    elif how == "empty class":
        imagenet_tree(root)
        (root / "train" / "n04").mkdir()
        (root / "train" / "n04" / "notes.txt").write_text("not an image")
    elif how == "val extra class":
        imagenet_tree(root)
        _image(root / "val" / "n09" / "x.png", (1, 2, 3))
    elif how == "val lacks class":
        imagenet_tree(root)
        for p in (root / "val" / "n03").iterdir():
            p.unlink()
        (root / "val" / "n03").rmdir()
    elif how == "no classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif how == "annotation names a missing file":
        tiny_imagenet_tree(root)
        with open(root / "val" / "val_annotations.txt", "a") as f:
            f.write("val_99.JPEG\tn01\t0\t0\t1\t1\n")
    return root


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("no root", r"missing: no such directory"),
        ("no val", r"val: missing; imagefolder expects"),
        ("empty class", r"train: class folders without images .*'n04'"),
        ("val extra class", r"val: val classes differ from train/'s \(classes train/ lacks: 'n09'"),
        ("val lacks class", r"train/ classes it lacks: 'n03'"),
        ("no classes", r"train: no class folders"),
        ("annotation names a missing file", r"val_annotations.txt:7: .*val_99.JPEG does not exist"),
    ],
)
def test_bad_trees_name_what_is_wrong(tmp_path, how, fragment):
    root = _break(tmp_path, how)
    with pytest.raises(data.DatasetError, match=fragment):
        data.load("imagefolder", root, image_size=16)


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_image_is_named(tmp_path, workers):
    root = imagenet_tree(tmp_path)
    bad = root / "val" / "n02" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    ds = data.load("imagefolder", root, image_size=16)
    with pytest.raises(data.DatasetError, match=r"broken\.JPEG: cannot decode the image"):
        Trainer(ds, TrainConfig(epochs=1), workers=workers).accuracy(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
        )


def test_imagefolder_needs_a_directory():
    with pytest.raises(data.DatasetError, match="pass DIR"):
        data.load("imagefolder")
