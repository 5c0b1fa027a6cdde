"""`score_stitches`: every score of a stitched model beside accuracy, from two passes over the data.

For a stitched model ``S`` (sender up to layer i, stitch, receiver after layer j) and its receiver ``B``:

- ``loss``, ``accuracy``: ``S``'s task loss and accuracy (`Task`); ``receiver_loss``, ``receiver_accuracy``:
  ``B``'s own.
- ``zero_ablation_loss``, ``mean_ablation_loss``: the loss of ``B`` with its layer-j output replaced by zeros,
  or by its mean over the data (for tokens ``[T, D]``, one mean vector over all samples and counted positions,
  as the sparse-autoencoder literature takes it; for maps and vectors, the mean of each element).
- ``loss_recovered_zero``, ``loss_recovered_mean``: ``(L_ablated - L_S) / (L_ablated - L_B)``: 1 when the
  stitch does as well as the receiver's own layer, 0 when it does no better than the ablation.
- ``kl``: ``KL(B ‖ S)`` of the output distributions, in nats per sample (per unpadded position for sequences).
- ``agreement``: the fraction of scored predictions where ``S``'s top-1 class equals ``B``'s.
- ``fvu``: the fraction of variance unexplained of the stitch's output ``s`` against the expected
  representation ``e = B≤j(x)``: ``Σ‖s - e‖² / Σ‖e - ē‖²`` over samples (over the positions that count for
  tokens: `position_mask`), ``ē`` that same mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from .._errors import StitchError
from ..core import (
    BatchFn,
    Positions,
    as_loader,
    call_model,
    first_input_tensor,
    iterate_batches,
    position_mask,
    prefix_outputs,
    resolve_device,
)
from ..stitches import StitchedModel
from ._plan import Plan, kl_to
from ._recipe import Recipe
from ._task import logits_of

__all__ = ["SCORES", "score_stitches"]

SCORES = (
    "accuracy",
    "loss",
    "receiver_accuracy",
    "receiver_loss",
    "zero_ablation_loss",
    "mean_ablation_loss",
    "loss_recovered_zero",
    "loss_recovered_mean",
    "kl",
    "agreement",
    "fvu",
)
"""The keys of each `score_stitches` result."""


@torch.no_grad()
def score_stitches(
    models: Sequence[StitchedModel],
    data: Any,
    *,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    recipe: Recipe | None = None,
    what: str = "the evaluation data",
    positions: Positions | None = None,
) -> list[dict[str, float]]:
    """Every score of `SCORES` for each stitched model, over ``data``.

    The first pass takes each receiver layer's mean output (for mean
    ablation and the FVU's denominator), the second scores everything. The
    data's labels are used as in `evaluate_stitches` (a causal language
    model takes its next tokens from ``input_ids``); positions whose
    ``attention_mask`` is 0 count nowhere.

    Args:
        models: stitched models (they may share networks).
        data: a Dataset, DataLoader or iterable of batches.
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        device: where to run.
        batch_size: batch size when ``data`` is a Dataset.
        recipe: run in this recipe's numerics (its autocast).
        what: names the data in errors.
        positions: which token positions count in the mean ablation and the
            FVU besides unpadded ones (`Positions`; default: the recipe's).

    Returns:
        One ``{score: float}`` per model, keys `SCORES`.

    Raises:
        StitchError: a model that is not a `StitchedModel`, data without labels for a receiver that needs
            them, or bad data (see `iterate_batches`).
    """
    if not all(isinstance(m, StitchedModel) for m in models):
        raise StitchError("score_stitches takes StitchedModels from modelstitch.stitch()")
    dev = resolve_device(device)
    for m in models:
        m.to(dev)
    if positions is None and recipe is not None:
        positions = recipe.positions
    plan = Plan(
        models, "mse", positions=positions
    )  # provided and expected representations of every model, one forward each
    tasks = plan.tasks
    loader = as_loader(data, batch_size=batch_size, shuffle=False)
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(m.frozen())
        modes = [(m.stitch, m.stitch.training) for m in models]
        for m in models:
            m.stitch.eval()
        stack.callback(lambda: [s.train(mode) for s, mode in modes])
        if recipe is not None:
            stack.enter_context(recipe.autocast(dev))
        means = _means(plan, iterate_batches(loader, dev, batch_fn, what=what), positions)
        sums = [dict.fromkeys(("loss", "receiver_loss", "zero", "mean"), 0.0) for _ in models]
        counts = [
            dict.fromkeys(("weight", "correct", "receiver_correct", "agree", "kl", "kl_rows"), 0.0) for _ in models
        ]
        errors = [0.0] * len(models)
        for x, y in iterate_batches(loader, dev, batch_fn, what=what):
            labels = tasks[0].labels_for(x, y) if y is not None or all(t.causal for t in tasks) else None
            if labels is None:
                raise StitchError(f"scores need labels: {what} yields inputs only, and no receiver is a causal LM")
            reps = plan.frozen_outputs(x)
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            own: dict[int, Any] = {}
            ablated: dict[str, tuple[Any, Any]] = {}
            for i, (m, task) in enumerate(zip(models, tasks)):
                expected = reps[plan.expected_keys[i]]
                stitched_out = m.adapt(reps[plan.provided_keys[i]])
                key = plan.expected_keys[i]
                if key not in ablated:  # cells that share a receiver layer share its ablations
                    mean = means[key][0].expand_as(expected).to(expected)
                    ablated[key] = (
                        m.receiver_suffix(torch.zeros_like(expected), x),
                        m.receiver_suffix(mean, x),
                    )
                outputs = {"loss": m.receiver_suffix(stitched_out, x), "zero": ablated[key][0], "mean": ablated[key][1]}
                if id(m.receiver) not in own:
                    own[id(m.receiver)] = call_model(m.receiver, x)
                outputs["receiver_loss"] = own[id(m.receiver)]
                right, scored = task.hits(outputs["loss"], labels)
                if not scored:
                    continue
                count = counts[i]
                count["weight"] += scored
                count["correct"] += right
                count["receiver_correct"] += task.hits(outputs["receiver_loss"], labels)[0]
                for key, out in outputs.items():
                    sums[i][key] += float(task.loss(out, labels)) * scored
                count["agree"] += _agreement(task, outputs["loss"], outputs["receiver_loss"], labels)
                reference = logits_of(outputs["receiver_loss"]).float()
                rows = _rows(reference, mask)
                count["kl"] += float(kl_to(reference, outputs["loss"], mask)) * rows
                count["kl_rows"] += rows
                keep = _weights(expected, position_mask(x, [expected], positions))
                errors[i] += float(((stitched_out.double() - expected.double()).square() * keep).sum())
    results = []
    for i in range(len(models)):
        count, total = counts[i], sums[i]
        n = count["weight"]
        if not n:
            raise StitchError(f"{what} has no scored labels (every label is -100, or the data is empty)")
        loss, own_loss = total["loss"] / n, total["receiver_loss"] / n
        zero, mean = total["zero"] / n, total["mean"] / n
        _, spread = means[plan.expected_keys[i]]
        results.append(
            {
                "accuracy": count["correct"] / n,
                "loss": loss,
                "receiver_accuracy": count["receiver_correct"] / n,
                "receiver_loss": own_loss,
                "zero_ablation_loss": zero,
                "mean_ablation_loss": mean,
                "loss_recovered_zero": _recovered(zero, loss, own_loss),
                "loss_recovered_mean": _recovered(mean, loss, own_loss),
                "kl": count["kl"] / count["kl_rows"],
                "agreement": count["agree"] / n,
                "fvu": errors[i] / spread if spread > 0 else math.nan,
            }
        )
    return results


def _recovered(ablated: float, stitched: float, own: float) -> float:
    """``(L_ablated - L_stitched) / (L_ablated - L_receiver)``; NaN when the ablation costs nothing."""
    gap = ablated - own
    return (ablated - stitched) / gap if abs(gap) > 1e-12 else math.nan


def _means(plan: Plan, batches: Any, positions: Positions | None) -> dict[str, tuple[torch.Tensor, float]]:
    """Per receiver layer: its mean output over the data ``[1, *shape]`` and the total squared deviation from it."""
    first: dict[str, torch.Tensor] = {}
    second: dict[str, float] = {}
    rows: dict[str, float] = {}
    keys = dict.fromkeys(plan.expected_keys)
    for x, _ in batches:
        first_input = first_input_tensor(x)
        device_type = "cpu" if first_input is None else first_input.device.type
        with torch.autocast(device_type=device_type, enabled=False):  # the receivers' outputs only, in full precision
            reps = prefix_outputs(plan.receiver_prefixes, x)
        for key in keys:
            e = reps[key].double()
            weight = _weights(e, position_mask(x, [e], positions))
            over = (0, 1) if e.dim() == 3 else (0,)  # tokens: one mean over samples and positions; maps: per pixel
            first[key] = first.get(key, 0) + (e * weight).sum(over, keepdim=True)
            second[key] = second.get(key, 0.0) + float((e.square() * weight).sum())
            rows[key] = rows.get(key, 0.0) + weight.sum(over, keepdim=True)
    out = {}
    for key in keys:
        count = rows[key]
        mean = first[key] / count.clamp_min(1)
        spread = second[key] - float((first[key].square() / count.clamp_min(1)).sum())  # Σ‖e‖² - n‖ē‖², per element
        out[key] = (mean.float(), spread)
    return out


def _weights(e: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-row weights: ``[B, T, 1]`` from a position mask for token representations ``[B, T, D]``, else ones."""
    if mask is not None:
        return mask.to(e.dtype).unsqueeze(-1)
    return torch.ones((e.shape[0], *[1] * (e.dim() - 1)), dtype=e.dtype, device=e.device)


def _rows(logits: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None and logits.dim() == 3:
        return float(mask.sum())
    return float(logits.shape[0])


def _agreement(task: Any, stitched: Any, own: Any, labels: torch.Tensor) -> float:
    """Scored predictions where the stitched top-1 equals the receiver's own top-1."""
    mine, _ = task.aligned(stitched, labels)
    theirs, kept = task.aligned(own, labels)
    scored = kept != -100 if not kept.is_floating_point() else torch.ones(kept.shape[: mine.dim() - 1], dtype=bool)
    return float(((mine.argmax(-1) == theirs.argmax(-1)) & scored.to(mine.device)).sum())
