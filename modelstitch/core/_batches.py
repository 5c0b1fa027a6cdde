"""Turning a caller's data (Dataset, DataLoader, tuples, dicts) into ``(x, y)`` batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .._errors import StitchError

__all__ = ["BatchFn", "as_loader", "is_batch_list", "iterate_batches", "loader", "split_batch", "to_device"]

BatchFn = Callable[[Any], tuple[Any, Any]]
"""Maps one batch from the loader to ``(inputs, labels)``; labels may be ``None``."""

_INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def split_batch(batch: Any, batch_fn: BatchFn | None = None) -> tuple[Any, torch.Tensor | None]:
    """Split one loader batch into ``(inputs, labels)``.

    Tuples and lists give their first two items; dicts are read by the usual
    key names (``"image"``/``"input"``/``"x"``, ``"label"``/``"target"``/``"y"``);
    a bare tensor is an unlabelled batch. ``batch_fn`` overrides all of this.

    Examples:
        >>> split_batch({"image": torch.zeros(2, 3), "label": torch.tensor([1, 0])})[1]
        tensor([1, 0])
    """
    if batch_fn is not None:
        return batch_fn(batch)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        if x is not None:
            return x, y
        raise StitchError(
            f"a batch dict needs one of the keys {_INPUT_KEYS} for inputs (found {sorted(batch)}); "
            "pass batch_fn=lambda b: (inputs, labels) to say where they are"
        )
    raise StitchError(
        f"cannot read (inputs, labels) from a batch of type {type(batch).__name__}; "
        "pass batch_fn=lambda b: (inputs, labels)"
    )


def loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """The library's one DataLoader builder: seeded order, pinned memory on CUDA machines.

    Args:
        dataset: any map-style dataset.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (in an order fixed by ``seed``).
        seed: seeds the loader's own `torch.Generator`.
        num_workers: worker processes (kept alive between epochs when > 0).
        drop_last: drop the last incomplete batch (only when there is more
            than one batch, so a small dataset still yields one).

    Returns:
        A `DataLoader`; memory is pinned when CUDA is available.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
        >>> [len(x) for x, _ in loader(data, batch_size=4, shuffle=True, seed=1)]
        [4, 4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StitchError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise StitchError(f"num_workers must be an int >= 0, got {num_workers!r}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last and len(dataset) > batch_size,  # type: ignore[arg-type]
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def as_loader(
    data: Dataset | DataLoader | Iterable,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    what: str = "data",
) -> Iterable:
    """Use a DataLoader (or any iterable of batches) as given; wrap a Dataset with `loader`.

    A dataset with a ``loader(batch_size=, shuffle=, seed=, drop_last=)``
    method (`modelstitch.data.TensorImages`) makes its own batches.

    A list or tuple whose items are already batches (``(inputs [B, ...],
    labels [B])`` with a 1-D label tensor)
    is used as an iterable of batches, not as a dataset of samples.

    Raises:
        StitchError: ``data`` is none of these, or it is empty.
    """
    if isinstance(data, DataLoader) or is_batch_list(data):
        return data
    if callable(getattr(data, "loader", None)):  # a dataset that makes its own batches (data.TensorImages)
        return data.loader(batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:  # type: ignore[arg-type]
            raise StitchError(f"{what} is empty")
        return loader(
            data,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
        )
    if isinstance(data, Iterable):
        return data
    raise StitchError(f"{what} must be a torch Dataset, a DataLoader or an iterable of batches, got {type(data)}")


def is_batch_list(data: object) -> bool:
    """Whether ``data`` is a list/tuple of ready-made ``(inputs, labels)`` batches."""
    if not isinstance(data, (list, tuple)) or not data:
        return False
    first = data[0]
    if isinstance(first, (list, tuple)) and len(first) == 2:
        labels = first[1]
        return isinstance(labels, torch.Tensor) and labels.dim() == 1 and isinstance(first[0], torch.Tensor)
    return False


def iterate_batches(
    loader: Iterable, device: torch.device, batch_fn: BatchFn | None = None, *, channels_last: bool = False
) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Yield ``(x, y)`` from ``loader`` moved to ``device``."""
    non_blocking = device.type == "cuda"
    for batch in loader:
        x, y = split_batch(batch, batch_fn)
        yield (
            to_device(x, device, channels_last=channels_last),
            (None if y is None else y.to(device, non_blocking=non_blocking)),
        )


def to_device(x: Any, device: torch.device, *, channels_last: bool = False) -> Any:
    """Move a tensor, or the tensors in a tuple/dict, to ``device``."""
    if isinstance(x, torch.Tensor):
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
        return x.to(device, non_blocking=device.type == "cuda", memory_format=fmt)
    if isinstance(x, tuple):
        return tuple(to_device(v, device, channels_last=channels_last) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last=channels_last) for k, v in x.items()}
    return x
