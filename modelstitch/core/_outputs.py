"""Calling a model on structured inputs and picking tensors out of structured outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._errors import StitchError

__all__ = [
    "OutputSelector",
    "call_model",
    "call_model_capturing_input",
    "first_input_tensor",
    "match_dtype",
    "replace_output",
    "select_output",
]

OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
"""Which tensor of a structured (tuple, dict, ``ModelOutput``) output to use:
``None`` for the first tensor, an ``int`` index, a ``str`` key, or a callable."""


def select_output(output: Any, selector: OutputSelector = None, *, layer: str = "?") -> torch.Tensor:
    """Pick one tensor out of a module's output.

    Args:
        output: a tensor, a tuple/list, or a mapping (dict, ``ModelOutput``).
        selector: ``None`` takes the tensor itself or the first tensor inside;
            an ``int`` indexes a sequence, a ``str`` keys a mapping, a callable
            is applied to the output.
        layer: the layer's address, for error messages.

    Returns:
        The selected tensor, shape ``[B, ...]``.

    Examples:
        >>> select_output((torch.zeros(1), torch.ones(2)), 1)
        tensor([1., 1.])
    """
    if callable(selector):
        picked = selector(output)
    elif selector is None:
        picked = _first_tensor(output)
    elif isinstance(output, torch.Tensor):
        raise StitchError(
            f"layer {layer!r} returns one tensor, so there is nothing for output={selector!r} to select (indexing "
            "the tensor would pick from the batch); drop the selector"
        )
    else:
        try:
            picked = output[selector]
        except (KeyError, IndexError, TypeError) as err:
            raise StitchError(
                f"layer {layer!r}: cannot select {selector!r} from its output of type {type(output).__name__}"
            ) from err
    if not isinstance(picked, torch.Tensor):
        raise StitchError(
            f"layer {layer!r} gives {type(output).__name__}, with no tensor at {selector!r}; "
            "pass output=<index, key or function> to pick the tensor to use"
        )
    return picked


def replace_output(output: Any, selector: OutputSelector, new: torch.Tensor, *, layer: str = "?") -> Any:
    """Return ``output`` with the tensor that `select_output` picks swapped for ``new``.

    Raises:
        StitchError: ``selector`` is a callable (there is no place to put ``new``).
    """
    if isinstance(output, torch.Tensor):
        return new
    if callable(selector):
        raise StitchError(f"layer {layer!r}: cannot replace an output picked by a function; use an index or key")
    key = _first_tensor_key(output) if selector is None else selector
    if isinstance(output, tuple):
        items = list(output)
        items[key] = new
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    if isinstance(output, list):
        items = list(output)
        items[key] = new
        return items
    if isinstance(output, Mapping):
        replaced = output.copy() if hasattr(output, "copy") else dict(output)
        replaced[key] = new
        return replaced
    raise StitchError(f"layer {layer!r}: cannot replace a tensor inside {type(output).__name__}")


def _first_tensor_key(output: Any) -> Any:
    items = output.items() if isinstance(output, Mapping) else enumerate(output)
    for key, value in items:
        if isinstance(value, torch.Tensor):
            return key
    return None


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list, Mapping)):
        key = _first_tensor_key(output)
        return None if key is None else output[key]
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Floating-point inputs are cast to the model's parameter dtype (see
    `match_dtype`), so networks of different precisions share one batch. A
    HuggingFace model called with a dict runs with ``use_cache=False`` (unless
    the dict says otherwise): stitching never generates, and a key/value cache
    would be filled and thrown away on every call.

    Raises:
        StitchError: ``inputs`` is a list (often ``[images, labels]`` from a
            loader, or a list of batches): pass the input tensor itself.
    """
    inputs = match_dtype(inputs, model)
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        _check_vocabulary(model, inputs)
        if getattr(getattr(model, "config", None), "use_cache", None) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}  # a HuggingFace model: no key/value cache to fill and drop
        return model(**inputs)
    if isinstance(inputs, list):
        raise StitchError(
            f"a model input is a tensor, a tuple of positional inputs or a dict of keyword inputs, got a list of "
            f"{len(inputs)} items; for a batch [images, labels] pass the images tensor alone"
        )
    return model(inputs)


def _check_vocabulary(model: nn.Module, inputs: dict) -> None:
    """Refuse token ids that ``model``'s input embedding cannot index (a HuggingFace ``get_input_embeddings``)."""
    ids = inputs.get("input_ids")
    embeddings = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or not callable(embeddings):
        return
    try:
        table = embeddings()
    except Exception:  # a model's own method: anything it raises means "no embedding to check against"
        return
    size = getattr(table, "num_embeddings", None)
    if size is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise StitchError(
            f"{type(model).__name__} embeds token ids 0..{size - 1}, but the input_ids range from {low} to {high}: "
            "both networks must read the same token ids (the same tokenizer, a vocabulary each can index)"
        )


def call_model_capturing_input(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` and return the tensor that counts as its ``"input"``."""
    call_model(model, inputs)
    first = first_input_tensor(inputs)
    if first is None:
        raise StitchError(f"example_input must be a tensor, or a tuple/dict holding one; got {type(inputs).__name__}")
    return first


def first_input_tensor(inputs: Any) -> torch.Tensor | None:
    """The tensor that leads a model input: the tensor itself, or the first tensor of a tuple or dict.

    Its first dimension is the batch; it is what ``"input"`` captures.

    Examples:
        >>> first_input_tensor({"input_ids": torch.zeros(2, 5), "attention_mask": None}).shape
        torch.Size([2, 5])
    """
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs if isinstance(inputs, tuple) else tuple(inputs.values()) if isinstance(inputs, dict) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def match_dtype(inputs: Any, model: nn.Module) -> Any:
    """Cast floating-point tensors in ``inputs`` (a tensor, tuple or dict) to ``model``'s parameter dtype.

    Integer tensors (token ids, labels) and models without floating-point
    parameters are left alone.

    Examples:
        >>> match_dtype(torch.zeros(2, 3), nn.Linear(3, 1).double()).dtype
        torch.float64
    """
    weight = next(model.parameters(), None)
    if weight is None or not weight.is_floating_point():
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(weight.dtype) if inputs.is_floating_point() and inputs.dtype != weight.dtype else inputs
    if isinstance(inputs, tuple):
        return tuple(match_dtype(v, model) for v in inputs)
    if isinstance(inputs, dict):
        return {k: match_dtype(v, model) for k, v in inputs.items()}
    return inputs
