"""Evaluating classifiers and stitched models: `evaluate`, `evaluate_stitches`, `stitching_penalty`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._errors import StitchError
from ..core import BatchFn, ForwardLayout, as_loader, call_model, frozen, iterate_batches, resolve_device
from ..stitches import StitchedModel
from ._plan import LossFn, Plan
from ._recipe import Recipe
from ._task import logits_of, task_of

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
    what: str = "the evaluation data",
    per_sample: bool = False,
    move: bool = True,
    channels_last: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy and mean loss of several classifiers over one pass of ``data``.

    Stitched models that share a sender run it once per batch for all their
    layers. Models are moved to ``device`` (with ``move=False`` they are
    evaluated where they are: a caller that moved them once and evaluates
    them often, as `BestEpoch` does at every check of a training run, saves
    a walk over every module of both networks per model and call); modes
    are restored afterwards.
    Given the ``recipe`` the stitches were trained with, the forward passes
    run in its numerics (its autocast), so evaluation sees what training saw;
    without one they run in full precision. On the CPU, 4-D inputs go
    to the networks in the channels-last memory format (`core.ForwardLayout`:
    a quarter to a third less time for the presets' small ResNets, the
    same numbers; ``channels_last=False`` passes them as they come).

    Labels are class indices ``[B]`` (``-100`` marks a sample to leave out of
    both scores, as in `torch.nn.functional.cross_entropy`) or soft labels
    ``[B, classes]`` (accuracy against their argmax). Outputs ``[B, ..., C]``
    with labels ``[B, ...]`` score every position.

    Returns:
        One ``{"accuracy": float in [0, 1], "loss": float}`` per model;
        accuracy is NaN only for a model whose output has no class
        dimension (not a tensor, or ``[B]``: a custom ``loss_fn`` scores it).
        With ``per_sample=True`` each also holds ``"correct"``: a bool
        tensor ``[scored]``, whether each scored prediction was right, in
        the data's order (`Task.correct`), for paired comparisons.

    Raises:
        StitchError: NaN or infinite data (naming ``what`` and the sample), a
            model whose loss is NaN or infinite on finite data, labels that do
            not fit the outputs, or no labels at all.
    """
    dev = resolve_device(device)
    if move:
        for m in models:
            m.to(dev)
    loader = as_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stitched = [m for m in models if isinstance(m, StitchedModel)]
    plain = [m for m in models if not isinstance(m, StitchedModel)]
    plan = Plan(stitched, "task", loss_fn) if stitched else None
    tasks = [task_of(m.receiver if isinstance(m, StitchedModel) else m) for m in models]
    loss_fns = [loss_fn or task.loss for task in tasks]
    correct = torch.zeros(len(models), dtype=torch.float64)
    counted = torch.zeros(len(models), dtype=torch.float64)
    loss_sum = torch.zeros(len(models), dtype=torch.float64)
    weights = torch.zeros(len(models), dtype=torch.float64)
    samples: list[list[torch.Tensor]] = [[] for _ in models]
    seen = 0
    layout = ForwardLayout(dev if channels_last else None)

    def forward(x: Any) -> dict[int, Any]:
        outputs: dict[int, Any] = {}
        if plan is not None:
            reps = plan.frozen_outputs(x)
            for m, key in zip(stitched, plan.provided_keys):
                outputs[id(m)] = m.forward_from(reps[key], x)
        for m in plain:
            outputs[id(m)] = call_model(m, x)
        return outputs

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
            batches = iterate_batches(loader, dev, batch_fn, what=what)
            for number, (x, y) in enumerate(tqdm(batches, desc="eval", disable=not progress, leave=False)):
                if y is not None or all(t.causal for t in tasks):
                    y = tasks[0].labels_for(x, y)
                if y is None:
                    raise StitchError(
                        f"evaluation needs labels: {what} yields inputs only (a causal language model takes its next "
                        "tokens from input_ids); give labels, or train and score without them with objective='kl' or "
                        "'mse'"
                    )
                outputs = layout(forward, x)
                for i, m in enumerate(models):
                    out = outputs[id(m)]
                    hits = tasks[i].correct(out, y)
                    right, scored = int(hits.sum()), hits.numel()
                    correct[i] += right
                    counted[i] += scored
                    if per_sample:
                        samples[i].append(hits.cpu())
                    if _has_classes(out) and not scored:
                        continue  # every label of the batch is -100: nothing to score
                    loss = float(loss_fns[i](out, y))
                    if not math.isfinite(loss):
                        name = m.cell if isinstance(m, StitchedModel) else type(m).__name__
                        raise StitchError(
                            f"{name} gives a {loss} loss on batch {number} of {what}, whose values are all finite: "
                            "the network's output overflows or is NaN there"
                        )
                    weight = scored if _has_classes(out) and scored else y.shape[0]
                    loss_sum[i] += loss * weight
                    weights[i] += weight
                seen += y.shape[0]
        finally:
            for stitch_module, mode in modes:
                stitch_module.train(mode)
    if seen == 0:
        raise StitchError(f"{what} is empty")
    results: list[dict[str, Any]] = [
        {"accuracy": float(c / n) if n else math.nan, "loss": float(s / w) if w else math.nan}
        for c, n, s, w in zip(correct, counted, loss_sum, weights)
    ]
    if per_sample:
        for result, hits in zip(results, samples):
            result["correct"] = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return results


def _has_classes(output: Any) -> bool:
    try:
        return logits_of(output).dim() >= 2
    except StitchError:
        return False


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
