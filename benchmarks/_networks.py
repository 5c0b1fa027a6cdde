"""What the study benchmarks share: a small preset's data and its networks, trained once into a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import modelstitch as ms
from modelstitch.study import PRESETS, Preset, load_dataset, zoo_models


def preset_networks(
    data: str, root: str | None, limit: int | None, out: str | Path, device: torch.device
) -> tuple[Preset, Any, Any, dict[str, torch.nn.Module]]:
    """The quick preset (``data="digits"``) or cifar-small (``"cifar10"``, from ``root``): its training and test
    images (``limit`` of each instead of the preset's) and its networks, trained on augmented images into
    ``out`` the first time and loaded from there after.

    Returns:
        ``(preset, train, test, networks by name)``.
    """
    preset = PRESETS["quick" if data == "digits" else "cifar-small"]
    train = ms.data.subset(load_dataset(preset.dataset, train=True, root=root), limit or preset.limit)
    test = ms.data.subset(load_dataset(preset.dataset, train=False, root=root), limit or preset.test_limit)
    augmented = ms.data.subset(load_dataset(preset.dataset, train=True, root=root, augment=True), limit or preset.limit)
    models, _ = zoo_models(
        preset, out=Path(out), train_data=augmented, test_data=test, seed=0, device=device, progress=False
    )
    return preset, train, test, models


def pair_cells(models: dict[str, torch.nn.Module], pair: str, example: torch.Tensor) -> list[ms.StitchedModel]:
    """Every layer of the first network of ``pair`` (``"R1111,R1211"``) into every layer of the second, as a
    `Study`'s default layers, unstarted."""
    a, b = pair.split(",")
    return [
        ms.stitch(models[a], sl, models[b], rl, example_input=example)
        for sl in ms.zoo.layer_names(models[a])
        for rl in ms.zoo.layer_names(models[b])
    ]
