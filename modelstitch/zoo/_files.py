"""Zoo networks as ``.safetensors`` files with their metadata."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._errors import StitchError
from ..core import load_checkpoint, save_checkpoint
from ._resnet import Blocks, SmallResNet, architecture_name, parse_blocks, small_resnet

__all__ = ["load_model", "save_model"]


def save_model(
    path: str | os.PathLike[str],
    model: SmallResNet,
    *,
    dataset: str,
    test_accuracy: float | None = None,
    seed: int | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Save a zoo model as a ``.safetensors`` checkpoint with its metadata.

    The metadata records ``architecture`` (e.g. ``"R1211"``), ``blocks``,
    ``width``, ``num_classes``, ``dataset``, ``test_accuracy``, ``seed`` and
    ``library_version``; `load_model` rebuilds the model from it.

    Args:
        path: the file to write (atomically), conventionally ``*.safetensors``.
        model: a `SmallResNet`.
        dataset: what it was trained on, e.g. ``"cifar10"``.
        test_accuracy: its test accuracy in [0, 1], if measured.
        seed: the training seed, if any.
        training: how it was trained, e.g. the recipe and a fingerprint of the
            data (JSON-encodable); stored as ``metadata["training"]``.

    Returns:
        ``path`` as a `pathlib.Path`.

    Raises:
        StitchError: ``model`` is not a `SmallResNet`, or the file cannot be
            written (a full disk, a read-only folder; see `save_checkpoint`).
    """
    if not isinstance(model, SmallResNet):
        raise StitchError(
            f"save_model saves SmallResNets (from modelstitch.zoo.small_resnet), got {type(model).__name__}; "
            "use modelstitch's save_checkpoint for other models"
        )
    metadata = {
        "architecture": model.architecture,
        "blocks": list(model.blocks),
        "width": model.width,
        "num_classes": model.num_classes,
        "dataset": str(dataset),
        "test_accuracy": None if test_accuracy is None else float(test_accuracy),
        "seed": seed,
        "training": None if training is None else dict(training),
    }
    return save_checkpoint(path, model, metadata)


def load_model(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    expected_architecture: Blocks | None = None,
) -> SmallResNet:
    """Load a zoo model saved by `save_model`.

    Never unpickles: the file is read with safetensors only.

    Args:
        path: a checkpoint written by `save_model`.
        map_location: the device to put the model on.
        expected_architecture: if given (``"R2222"`` or ``(2, 2, 2, 2)``), the
            file must hold that architecture.

    Returns:
        The `SmallResNet`, in eval mode. Its ``checkpoint_metadata`` attribute
        holds the file's metadata (``dataset``, ``test_accuracy``, ...).

    Raises:
        StitchError: the file is missing or not a zoo checkpoint, its metadata
            and weights disagree, or it is not ``expected_architecture``.
    """
    state, metadata = load_checkpoint(path)
    where = str(path)
    missing = [k for k in ("architecture", "blocks", "width", "num_classes") if k not in metadata]
    if missing:
        raise StitchError(f"{where!r} is not a zoo model checkpoint: its metadata lacks {missing}")
    try:
        blocks = parse_blocks(tuple(metadata["blocks"]))
        model = small_resnet(blocks, num_classes=metadata["num_classes"], width=metadata["width"])
    except (StitchError, TypeError) as err:
        raise StitchError(f"{where!r} has invalid zoo metadata: {err}") from None
    if metadata["architecture"] != model.architecture:
        raise StitchError(
            f"{where!r} says architecture {metadata['architecture']!r} but its blocks {list(blocks)} "
            f"build {model.architecture!r}"
        )
    if expected_architecture is not None:
        expected = architecture_name(expected_architecture)
        if expected != model.architecture:
            raise StitchError(f"{where!r} holds a {model.architecture} model, but {expected} was expected")
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise StitchError(
            f"{where!r}: weight {k!r} has shape {tuple(state[k].shape)} but a {model.architecture} of width "
            f"{model.width} with {model.num_classes} classes needs {tuple(own[k].shape)}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StitchError(
            f"{where!r}: weights do not match a {model.architecture} (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.checkpoint_metadata = metadata
    return model.to(map_location).eval()
