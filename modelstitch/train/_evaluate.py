"""Evaluating classifiers and stitched models: `evaluate`, `evaluate_stitches`, `stitching_penalty`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._errors import StitchError
from ..core import BatchFn, as_loader, frozen, iterate_batches, resolve_device
from ..stitches import StitchedModel
from ._plan import LossFn, Plan, cross_entropy
from ._recipe import Recipe

__all__ = ["evaluate", "evaluate_stitches", "stitching_penalty"]


@torch.no_grad()
def evaluate_stitches(
    models: Sequence[nn.Module],
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    progress: bool = False,
    num_workers: int = 0,
    recipe: Recipe | None = None,
) -> list[dict[str, float]]:
    """Accuracy and mean loss of several classifiers over one pass of ``data``.

    Stitched models that share a sender run it once per batch for all their
    layers. Models are moved to ``device``; modes are restored afterwards.
    Given the ``recipe`` the stitches were trained with, the forward passes
    run in its numerics (its autocast), so evaluation sees what training saw;
    without one they run in full precision.

    Returns:
        One ``{"accuracy": float in [0, 1], "loss": float}`` per model.
    """
    dev = resolve_device(device)
    loss_fn = loss_fn or cross_entropy
    loader = as_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stitched = [m for m in models if isinstance(m, StitchedModel)]
    plain = [m for m in models if not isinstance(m, StitchedModel)]
    for m in models:
        m.to(dev)
    plan = Plan(stitched, "task", loss_fn) if stitched else None
    correct = torch.zeros(len(models), dtype=torch.float64)
    loss_sum = torch.zeros(len(models), dtype=torch.float64)
    seen = 0
    with contextlib.ExitStack() as stack:
        for m in stitched:
            stack.enter_context(m.frozen())
        if plain:
            stack.enter_context(frozen(*plain))
        modes = [(s.stitch, s.stitch.training) for s in stitched]
        for s in stitched:
            s.stitch.eval()
        if recipe is not None:
            stack.enter_context(recipe.autocast(dev))
        try:
            for x, y in tqdm(iterate_batches(loader, dev, batch_fn), desc="eval", disable=not progress, leave=False):
                if y is None:
                    raise StitchError("evaluation needs labels: the data yields inputs only")
                outputs: dict[int, Any] = {}
                if plan is not None:
                    reps = plan.frozen_outputs(x)
                    for m, key in zip(stitched, plan.provided_keys):
                        outputs[id(m)] = m.forward_from(reps[key], x)
                for m in plain:
                    outputs[id(m)] = m(x)
                for i, m in enumerate(models):
                    out = outputs[id(m)]
                    loss_sum[i] += float(loss_fn(out, y)) * y.shape[0]
                    if isinstance(out, torch.Tensor) and out.dim() == 2:
                        correct[i] += (out.argmax(1) == y).sum().item()
                seen += y.shape[0]
        finally:
            for stitch_module, mode in modes:
                stitch_module.train(mode)
    if seen == 0:
        raise StitchError("evaluation data is empty")
    return [{"accuracy": float(c / seen), "loss": float(s / seen)} for c, s in zip(correct, loss_sum)]


def evaluate(model: nn.Module, data: Any, **options: Any) -> dict[str, float]:
    """Accuracy and mean loss of a classifier (a `StitchedModel` or any network).

    Args:
        model: maps ``[B, ...]`` inputs to logits ``[B, classes]``.
        data: a Dataset or DataLoader of ``(inputs, labels)``.
        **options: ``loss_fn``, ``batch_fn``, ``device``, ``batch_size``,
            ``progress``, as for `evaluate_stitches`.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float}``.
    """
    return evaluate_stitches([model], data, **options)[0]


def stitching_penalty(stitched: StitchedModel, receiver: nn.Module, data: Any, **options: Any) -> float:
    """The receiver's own accuracy minus the stitched network's, on ``data`` (one pass).

    Positive when stitching costs accuracy, as in Bansal et al. (2021).
    """
    stitched_result, receiver_result = evaluate_stitches([stitched, receiver], data, **options)
    return receiver_result["accuracy"] - stitched_result["accuracy"]
