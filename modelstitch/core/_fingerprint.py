"""Fingerprints: short hashes that say whether two networks or two datasets are the same."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

__all__ = ["fingerprint_data", "fingerprint_module"]


def fingerprint_module(model: nn.Module) -> str:
    """A hash of ``model``'s state dict: every name, dtype, shape and value (buffers included).

    Two networks with bitwise equal weights and statistics get the same
    fingerprint, whatever device they are on.

    Examples:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> fingerprint_module(a) == fingerprint_module(b)
        False
        >>> _ = b.load_state_dict(a.state_dict())
        >>> fingerprint_module(a) == fingerprint_module(b), len(fingerprint_module(a))
        (True, 16)
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(_tensor_bytes(value))
    return digest.hexdigest()[:16]


def fingerprint_data(data: Any, *, samples: int = 16) -> dict[str, Any]:
    """What identifies a dataset: its size, a hash of evenly spaced samples, and its transform.

    The samples are read with the torch RNG seeded (and restored afterwards),
    so a dataset with random augmentation still fingerprints the same way
    each time. A DataLoader is fingerprinted by its dataset and batch size; an
    iterable of ready-made batches by its first batch.

    Args:
        data: a map-style Dataset, a DataLoader, or an iterable of batches.
        samples: how many samples to hash.

    Returns:
        ``{"size": int or None, "samples": hex digest, "transform": str or None}``.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> a = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> fingerprint_data(a) == fingerprint_data(TensorDataset(torch.arange(10.0), torch.arange(10)))
        True
        >>> fingerprint_data(a)["size"]
        10
    """
    extra: dict[str, Any] = {}
    if isinstance(data, DataLoader):
        extra["batch_size"] = data.batch_size
        data = data.dataset
    digest = hashlib.sha256()
    size: int | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            size = len(data)
            step = max(1, size // samples)
            for i in range(0, size, step)[:samples]:
                _update(digest, data[i])
        else:
            _update(digest, next(iter(data), None))
    return {"size": size, "samples": digest.hexdigest()[:16], "transform": _transform(data), **extra}


def _transform(data: Any) -> str | None:
    while isinstance(data, Subset):
        data = data.dataset
    transform = getattr(data, "transform", None)
    return None if transform is None else " ".join(repr(transform).split())


def _update(digest: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        digest.update(f"{item.dtype}:{tuple(item.shape)};".encode())
        digest.update(_tensor_bytes(item))
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(str(key).encode())
            _update(digest, item[key])
    elif isinstance(item, (tuple, list)):
        for value in item:
            _update(digest, value)
    else:
        digest.update(repr(item).encode())


def _tensor_bytes(value: torch.Tensor) -> bytes:
    flat = value.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()
