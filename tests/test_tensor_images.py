"""Decoded image datasets: decoded once and cached, equal to torchvision's ImageFolder, batched on their device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import modelstitch as ms
from modelstitch import data, zoo
from modelstitch.data import TensorImages, decoded_image_folder

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["cat", "dog"]:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


def test_decoded_equals_image_folder_and_is_cached(folder, tmp_path):
    cache = tmp_path / "cache"
    decoded = decoded_image_folder(folder, mean=MEAN, std=STD, cache_dir=cache)
    reference = data.image_folder(folder, mean=MEAN, std=STD)
    assert decoded.classes == reference.classes == ["cat", "dog"]
    assert len(decoded) == len(reference) == 12
    for i in range(12):
        x, y = decoded[i]
        want, label = reference[i]
        torch.testing.assert_close(x, want)
        assert int(y) == label
    (cached,) = cache.iterdir()
    stamp = cached.stat().st_mtime_ns
    decoded_image_folder(folder, mean=MEAN, std=STD, cache_dir=cache)
    assert cached.stat().st_mtime_ns == stamp  # read back, not decoded again
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "dog" / "new.png")
    assert len(decoded_image_folder(folder, mean=MEAN, std=STD, cache_dir=cache)) == 13  # the folder changed


def test_batches_are_seeded_whole_and_augmented_in_shape():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    plain = TensorImages(images, torch.arange(10), mean=MEAN, std=STD)
    first = [y.tolist() for _, y in plain.loader(batch_size=4, shuffle=True, seed=3)]
    again = [y.tolist() for _, y in plain.loader(batch_size=4, shuffle=True, seed=3)]
    assert first == again and sorted(i for batch in first for i in batch) == list(range(10))
    assert len(plain.loader(batch_size=4, shuffle=False, drop_last=True)) == 2
    x, _ = next(iter(plain.loader(batch_size=10, shuffle=False)))
    torch.testing.assert_close(x[4], plain[4][0])
    augmented = plain.with_augment(True)
    xa, _ = next(iter(augmented.loader(batch_size=10, shuffle=False, seed=1)))
    assert xa.shape == x.shape and not torch.equal(xa, x)


def test_a_study_trains_from_decoded_images_and_keeps_them_decoded():
    digits = data.digits()
    raw = ((digits.tensors[0] * torch.tensor(digits.std)[:, None, None] + torch.tensor(digits.mean)[:, None, None])
           .clamp(0, 1) * 255).round().to(torch.uint8)  # fmt: skip
    images = TensorImages(raw, digits.tensors[1], mean=digits.mean, std=digits.std)
    train, held = ms.train.holdout_split(images, 0.15, seed=0)
    assert isinstance(train, TensorImages) and isinstance(held, TensorImages)
    assert isinstance(data.subset(images, 100), TensorImages)
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4).eval()
    stitched = ms.stitch(net, "layer2.0", net, "layer2.0", example_input=images[0][0][None])
    result = ms.train_stitch(stitched, data.subset(images, 300), recipe=ms.Recipe(batch_size=32, epochs=1),
                             device="cpu", progress=False)  # fmt: skip
    assert result.selected_epoch is not None and result.steps == 7  # 225 training images (75 held out) at batch 32
