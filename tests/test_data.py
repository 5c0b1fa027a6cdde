"""Tests for modelstitch.data: digits, CIFAR-10 loaders, helpers."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from modelstitch._errors import StitchError
from modelstitch.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DIGITS_CLASSES,
    cifar10,
    cifar10_folder,
    denormalize,
    digits,
    image_folder,
    image_transform,
    loader,
    subset,
)


def _cifar10_dir() -> Path:
    folder = os.environ.get("MODELSTITCH_CIFAR10_DIR")
    if not folder or not (Path(folder) / "test").is_dir():
        pytest.skip("set MODELSTITCH_CIFAR10_DIR to a CIFAR-10 JPEG copy (<dir>/train/<class>/*.jpg, <dir>/test/...)")
    return Path(folder)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_dtypes():
    train, test = digits(train=True), digits(train=False)
    assert len(train) == 1437 and len(test) == 360
    for ds in (train, test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey as RGB
    assert train.classes == DIGITS_CLASSES == tuple("0123456789")


def test_digits_normalisation_uses_train_statistics():
    train, test = digits(train=True), digits(train=False)
    x = train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert train.mean == test.mean and train.std == test.std

    raw = digits(train=False, normalize=False).tensors[0]
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(denormalize(test.tensors[0], test.mean, test.std), raw, atol=1e-5)


def test_digits_split_is_a_partition():
    bunch = load_digits()
    full = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    full = F.interpolate(full[:, None], size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)

    def key(img: torch.Tensor, label: int) -> tuple[bytes, int]:
        return img.numpy().tobytes(), label

    everything = Counter(key(img, int(lab)) for img, lab in zip(full, bunch.target, strict=True))
    parts = Counter()
    for train in (True, False):
        x, y = digits(train=train, normalize=False).tensors
        parts.update(key(img[0], int(lab)) for img, lab in zip(x, y, strict=True))
    assert parts == everything


def test_digits_image_size_resizes_the_same_split():
    native = load_digits()
    small, big = digits(train=False, normalize=False, image_size=8), digits(train=False, normalize=False)
    assert small.tensors[0].shape[1:] == (3, 8, 8) and torch.equal(small.tensors[1], big.tensors[1])
    # at their own 8x8 the images are the bundled pixels (bilinear resizing to the same size is the identity)
    pixels = {img.tobytes() for img in (native.images / 16.0).astype(np.float32)}
    assert all(img[0].numpy().tobytes() in pixels for img in small.tensors[0])
    for bad in (7, 16.0, True, "16"):
        with pytest.raises(StitchError, match="image_size"):
            digits(image_size=bad)


def test_digits_split_is_deterministic_and_stratified():
    a, b = digits(train=False, seed=0), digits(train=False, seed=0)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other = digits(train=False, seed=1)
    assert not torch.equal(a.tensors[1], other.tensors[1]) or not torch.equal(a.tensors[0], other.tensors[0])

    totals = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(a.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1)


# --------------------------------------------------------------------------- helpers


def test_subset():
    ds = digits(train=False)
    assert subset(ds, None) is ds
    assert subset(ds, 10_000) is ds
    small, again, larger = subset(ds, 20, seed=5), subset(ds, 20, seed=5), subset(ds, 50, seed=5)
    assert len(small) == 20 and small.indices == again.indices
    assert larger.indices[:20] == small.indices
    assert subset(ds, 20, seed=6).indices != small.indices
    for bad in (0, -3, 2.5, True):
        with pytest.raises(StitchError, match="limit"):
            subset(ds, bad)


def test_loader_is_seeded():
    ds = digits(train=False)

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in loader(ds, batch_size=64, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    batches = list(loader(ds, batch_size=64, shuffle=False, drop_last=True))
    assert len(batches) == 360 // 64
    with pytest.raises(StitchError):
        loader(ds, batch_size=0, shuffle=False)


def test_denormalize():
    x = torch.rand(2, 3, 4, 4)
    normed = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(denormalize(normed, CIFAR10_MEAN, CIFAR10_STD), x, atol=1e-6)
    assert denormalize(torch.full((3, 2, 2), 100.0), CIFAR10_MEAN, CIFAR10_STD).max() == 1
    with pytest.raises(StitchError):
        denormalize(torch.zeros(2, 4, 4), CIFAR10_MEAN, CIFAR10_STD)


def test_image_transform():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    plain = image_transform(normalize=False)(image)
    assert plain.shape == (3, 32, 32) and plain.min() >= 0 and plain.max() <= 1
    torch.manual_seed(0)
    assert image_transform(augment=True)(image).shape == (3, 32, 32)
    assert image_transform(image_size=16)(image).shape == (3, 16, 16)


# --------------------------------------------------------------------------- folders


def _write_folder(root: Path, classes: list[str], per_class: int = 2, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")


def test_image_folder(tmp_path):
    _write_folder(tmp_path / "imgs", ["b", "a"], size=20)
    ds = image_folder(tmp_path / "imgs", image_size=16)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0


def test_folder_errors(tmp_path):
    with pytest.raises(StitchError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StitchError, match="no images"):
        image_folder(tmp_path / "empty")
    with pytest.raises(StitchError, match="train"):
        cifar10_folder(tmp_path / "nope")
    _write_folder(tmp_path / "wrong" / "train", ["cat", "dog"])
    with pytest.raises(StitchError, match="not CIFAR-10's"):
        cifar10_folder(tmp_path / "wrong")


def test_cifar10_missing_says_download(tmp_path):
    with pytest.raises(StitchError, match="download=True") as info:
        cifar10(tmp_path, train=False)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cifar10_folder_labels_in_cifar_order():
    root = _cifar10_dir()
    test = cifar10_folder(root, train=False)
    assert tuple(test.classes) == CIFAR10_CLASSES
    assert test.class_to_idx == {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    assert Counter(test.targets) == dict.fromkeys(range(10), 1000)
    for label in (0, 3, 9):
        index = test.targets.index(label)
        path, target = test.samples[index]
        assert Path(path).parent.name == CIFAR10_CLASSES[label] and target == label
        x, y = test[index]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == label
    train = cifar10_folder(root, train=True, augment=True)
    assert len(train) == 50_000 and train.classes == test.classes
    assert train[0][0].shape == (3, 32, 32)
