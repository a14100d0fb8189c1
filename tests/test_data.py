"""Datasets: the embedded digits, CIFAR binary files (built here), synthetic; the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sparse_ops import data
from sparse_ops.imp import RoundContext
from sparse_ops.training import TrainConfig, Trainer, TrainingError


def test_digits_shapes_splits_and_range():
    ds = data.load("digits", image_size=16)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1257, 180, 360)
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.train.images.dtype == torch.float32
    assert float(ds.train.images.min()) >= 0 and float(ds.train.images.max()) <= 1
    assert set(ds.train.labels.tolist()) == set(range(10))
    assert not ds.flip  # mirrored digits are not digits
    again = data.load("digits", image_size=16)
    assert torch.equal(ds.test.labels, again.test.labels)  # fixed split


def _write_cifar10(root, per_file=20):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(root / name)
    return root


def test_cifar10_binary_records_are_decoded(tmp_path):
    root = _write_cifar10(tmp_path)
    raw = np.fromfile(root / "test_batch.bin", dtype=np.uint8).reshape(-1, 3073)
    ds = data.load("cifar10", tmp_path)
    assert len(ds.test) == 20 and len(ds.train) + len(ds.val) == 100
    assert ds.test.labels[0] == raw[0, 0]
    # record layout: label, then 1024 R, 1024 G, 1024 B bytes, row-major 32×32
    assert ds.test.images[0, 1, 0, 5] == pytest.approx(raw[0, 1 + 1024 + 5] / 255)
    assert ds.test.images[0, 2, 3, 0] == pytest.approx(raw[0, 1 + 2048 + 3 * 32] / 255)
    assert ds.flip and ds.num_classes == 10


def test_cifar100_uses_the_fine_label(tmp_path):
    sub = tmp_path / "cifar-100-binary"
    sub.mkdir()
    for name in ("train.bin", "test.bin"):
        rec = np.zeros((30, 3074), dtype=np.uint8)
        rec[:, 0] = 3  # coarse
        rec[:, 1] = np.arange(30) % 100  # fine
        rec.tofile(sub / name)
    ds = data.load("cifar100", tmp_path)  # the parent folder works too
    assert ds.num_classes == 100
    assert sorted(ds.test.labels.tolist()) == list(range(30))


@pytest.mark.parametrize(
    ("name", "files", "label_bytes", "label"),
    [("cifar10", ["data_batch_1.bin"], 1, 10), ("cifar100", ["train.bin", "test.bin"], 2, 100)],
)
def test_out_of_range_label_names_the_file(tmp_path, name, files, label_bytes, label):
    if name == "cifar10":
        _write_cifar10(tmp_path)
    for file in files:
        rec = np.zeros((10, label_bytes + 3072), dtype=np.uint8)
        rec[7, label_bytes - 1] = label  # one past the last class
        rec.tofile(tmp_path / file)
    with pytest.raises(data.DatasetError, match=rf"{files[0]}: record 7 has label {label}"):
        data.load(name, tmp_path)


def test_wrong_directory_names_the_expected_files(tmp_path):
    (tmp_path / "data_batch_1").mkdir()  # the pickle release's names, not .bin
    with pytest.raises(data.DatasetError, match=r"missing data_batch_1\.bin.*test_batch\.bin"):
        data.load("cifar10", tmp_path)


def test_truncated_cifar_file(tmp_path):
    root = _write_cifar10(tmp_path)
    raw = (root / "data_batch_3.bin").read_bytes()
    (root / "data_batch_3.bin").write_bytes(raw[:-10])
    with pytest.raises(data.DatasetError, match="data_batch_3.bin: .* not a whole number"):
        data.load("cifar10", tmp_path)


def test_cifar_needs_a_directory_and_unknown_names():
    with pytest.raises(data.DatasetError, match="nothing is downloaded"):
        data.load("cifar10")
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnist'"):
        data.load("mnist")


class SmallNet(nn.Module):
    """Keeps spatial layout: synthetic classes differ by spatial template."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_trainer_learns_synthetic_and_keeps_best_val():
    ds = data.load("synthetic", image_size=8)
    trainer = Trainer(ds, TrainConfig(epochs=4, lr=0.2, batch_size=64))
    model = SmallNet()
    before = trainer.accuracy(model)
    result = trainer.fit(model)
    assert trainer.accuracy(model, "val") == pytest.approx(result["best_val"])
    assert result["best_val"] > 40 and trainer.accuracy(model) > before


def test_trainer_is_deterministic():
    ds = data.load("synthetic", image_size=8)
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = SmallNet()
        Trainer(ds, TrainConfig(epochs=1, batch_size=64)).fit(model)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("rewind_epoch", [0, 2])
def test_trainer_captures_the_rewind_point(rewind_epoch):
    ds = data.load("synthetic", image_size=8)
    captured = []
    model = SmallNet()
    init = model.conv.weight.detach().clone()
    ctx = RoundContext(0, 1, lambda: captured.append(model.conv.weight.detach().clone()))
    Trainer(ds, TrainConfig(epochs=3, rewind_epoch=rewind_epoch, batch_size=64)).fit(model, ctx)
    assert len(captured) == 1
    assert torch.equal(captured[0], init) == (rewind_epoch == 0)


def test_augmentation_keeps_shape_and_flips_only_when_allowed():
    ds = data.load("digits", image_size=16)
    trainer = Trainer(ds)
    x = ds.train.images[:8]
    out = trainer._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": 0}, "epochs"),
        ({"rewind_epoch": 9, "epochs": 3}, "rewind_epoch"),
        ({"lr": 0}, "lr must be"),
    ],
)
def test_bad_training_config(kwargs, fragment):
    with pytest.raises(TrainingError, match=fragment):
        TrainConfig(**kwargs)
