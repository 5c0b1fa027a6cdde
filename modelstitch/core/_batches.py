"""Turning a caller's data (Dataset, DataLoader, tuples, dicts) into ``(x, y)`` batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from .._errors import StitchError
from ._outputs import first_input_tensor

__all__ = [
    "BatchFn",
    "as_loader",
    "batch_rows",
    "is_batch_list",
    "iterate_batches",
    "loader",
    "split_batch",
    "to_device",
]

BatchFn = Callable[[Any], tuple[Any, Any]]
"""Maps one batch from the loader to ``(inputs, labels)``; labels may be ``None``."""

_INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_MODEL_KEYS = ("input_ids", "inputs_embeds")


def split_batch(batch: Any, batch_fn: BatchFn | None = None) -> tuple[Any, torch.Tensor | None]:
    """Split one loader batch into ``(inputs, labels)``.

    Tuples and lists give their first two items; dicts are read by the usual
    key names (``"image"``/``"input"``/``"x"``, ``"label"``/``"target"``/``"y"``);
    a dict with ``"input_ids"`` (a HuggingFace batch) gives every key but
    ``"labels"`` as keyword inputs of the model; a bare tensor is an
    unlabelled batch. ``batch_fn`` overrides all of this.

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
        if any(k in batch for k in _MODEL_KEYS):  # a HuggingFace-style batch: every key but the labels is an input
            inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
            return inputs, next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        if x is not None:
            return x, y
        raise StitchError(
            f"a batch dict needs one of the keys {_INPUT_KEYS} for inputs, or {_MODEL_KEYS} for keyword inputs "
            f"(found {sorted(batch)}); pass batch_fn=lambda b: (inputs, labels) to say where they are"
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
    """Whether ``data`` is a list/tuple of ready-made batches, not a dataset of samples.

    A batch is ``(inputs [B, ...], labels [B, ...])`` with inputs a tensor or
    a dict of keyword inputs, or a HuggingFace-style dict holding
    ``input_ids [B, T]``.
    """
    if not isinstance(data, (list, tuple)) or not data:
        return False
    first = data[0]
    if isinstance(first, (list, tuple)) and len(first) == 2:
        inputs, labels = first
        if not isinstance(labels, torch.Tensor):
            return False
        if isinstance(inputs, Mapping):  # keyword inputs: batched when they hold [B, T] ids
            return labels.dim() >= 1 and _holds_batch(inputs)
        return isinstance(inputs, torch.Tensor) and labels.dim() == 1
    return isinstance(first, Mapping) and any(k in first for k in _MODEL_KEYS) and _holds_batch(first)


def _holds_batch(inputs: Mapping) -> bool:
    """Whether a dict of model inputs holds batches (``[B, T]`` token ids), not one sample's ``[T]``."""
    ids = next((inputs[k] for k in (*_MODEL_KEYS, *_INPUT_KEYS) if k in inputs), None)
    return isinstance(ids, torch.Tensor) and ids.dim() >= 2


def iterate_batches(
    loader: Iterable,
    device: torch.device,
    batch_fn: BatchFn | None = None,
    *,
    channels_last: bool = False,
    what: str = "the data",
) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Yield ``(x, y)`` from ``loader`` moved to ``device``, refusing batches no number can come from.

    Every batch is checked before it is used: floating-point inputs and
    labels must be finite, labels must be a tensor with one entry (or one row
    of soft labels) per input.

    Args:
        loader: a DataLoader or any iterable of batches.
        device: where the batches go.
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        channels_last: 4-D inputs in the channels-last memory format.
        what: names the data in errors (``"the held-out part of the training data"``).

    Raises:
        StitchError: a NaN or infinite value (naming ``what`` and the first
            offending sample's index), labels that are not a tensor, or a batch
            with more or fewer labels than inputs.
    """
    non_blocking = device.type == "cuda"
    seen = 0
    for number, batch in enumerate(loader):
        x, y = split_batch(batch, batch_fn)
        x = to_device(x, device, channels_last=channels_last)
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise StitchError(
                    f"{what}: labels must be a tensor of class indices (or of soft labels), got "
                    f"{type(y).__name__}{_example(y)}; map them to integers first"
                )
            y = y.to(device, non_blocking=non_blocking)
        rows = batch_rows(x)
        if y is not None and rows is not None and (y.dim() == 0 or y.shape[0] != rows):
            raise StitchError(
                f"{what}: batch {number} has {rows} inputs but {0 if y.dim() == 0 else y.shape[0]} labels; "
                "each input needs one label"
            )
        bad = _first_nonfinite_row(x, y)
        if bad is not None:
            where = _locate(loader, batch_fn, seen + bad, number, bad)
            raise StitchError(f"{what} holds NaN or infinite values: {where}")
        seen += rows or 0
        yield x, y


def batch_rows(x: Any) -> int | None:
    """The batch size of a model input: the first dimension of its leading tensor (``None`` if it has none)."""
    first = first_input_tensor(x)
    return None if first is None or first.dim() == 0 else int(first.shape[0])


def _example(y: Any) -> str:
    if isinstance(y, (list, tuple)) and y:
        return f" such as {y[0]!r}"
    return ""


def _first_nonfinite_row(x: Any, y: torch.Tensor | None) -> int | None:
    """The first row of the batch with a NaN or infinite float, or ``None``."""
    tensors = [x] if isinstance(x, torch.Tensor) else list(x.values() if isinstance(x, dict) else x)
    tensors.append(y)
    bad = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and not bool(torch.isfinite(t).all()):
            rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()
            first = int(rows[0])
            bad = first if bad is None else min(bad, first)
    return bad


def _locate(loader: Iterable, batch_fn: BatchFn | None, position: int, number: int, row: int) -> str:
    """Name the offending sample by its index in the data, as far as the loader allows."""
    dataset = getattr(loader, "dataset", None)
    sequential = (
        isinstance(loader, (list, tuple))
        or isinstance(getattr(loader, "sampler", None), SequentialSampler)
        or getattr(loader, "shuffle", None) is False  # a TensorImages loader
    )
    if not sequential:  # a shuffled pass: read the data once more, in order
        position, seen = -1, 0
        for batch in [] if dataset is None else as_loader(dataset, batch_size=256, shuffle=False):
            x, y = split_batch(batch, batch_fn)
            bad = _first_nonfinite_row(x, y)
            if bad is not None:
                position = seen + bad
                break
            seen += batch_rows(x) or 0
        if position < 0:  # no dataset to read in order, or the values come from augmentation
            return f"batch {number}, row {row} of a shuffled pass"
    where = f"sample {position}"
    if isinstance(dataset, Subset):
        where += f" (index {dataset.indices[position]} of the dataset it was split from)"
    return where + "; remove or repair it"


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
