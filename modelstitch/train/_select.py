"""Held-out selection: split off part of the training data and keep each stitch's best epoch on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .._errors import StitchError
from ..core import is_batch_list
from ..stitches import StitchedModel
from ._evaluate import evaluate_stitches
from ._recipe import Recipe

__all__ = ["RISING", "BestEpoch", "holdout_split", "splittable"]

#: A stitch whose held-out accuracy at its last epoch beat every earlier epoch (and its start) by at least this
#: much is flagged ``"rising"``: possibly under-trained. A smaller rise, or a lower loss alone, is noise here
#: (one held-out image of the quick preset's 215 is 0.47 point).
RISING = 0.01


def holdout_split(data: Any, fraction: float, *, seed: int) -> tuple[Any, Dataset | None]:
    """Split a map-style dataset into a training part and a held-out part (a seeded random split).

    Args:
        data: a map-style Dataset (anything with ``__getitem__`` and ``__len__``).
        fraction: share of the samples held out, in ``[0, 1)``; ``0`` holds out nothing.
        seed: seeds the split.

    Returns:
        ``(training part, held-out part)``: `Subset` views, the training part in
        the original order; ``(data, None)`` when ``fraction`` is 0.

    Raises:
        StitchError: ``data`` is a DataLoader or iterable (it cannot be split),
            or too small to leave samples on both sides.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> train, held = holdout_split(TensorDataset(torch.arange(20)), 0.15, seed=0)
        >>> len(train), len(held)
        (17, 3)
    """
    if fraction == 0:
        return data, None
    if not splittable(data):
        raise StitchError(
            f"Recipe(holdout={fraction}) holds out part of the training data to choose the best epoch, which needs "
            "a map-style Dataset, not a DataLoader or an iterable; pass the Dataset, or use Recipe(holdout=0)"
        )
    n = len(data)
    if n == 0:
        raise StitchError("the training data is empty")
    held = max(1, math.floor(n * fraction))
    if n - held < 1:
        raise StitchError(f"Recipe(holdout={fraction}) leaves no training samples out of {n}; use a lower holdout")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    train, rest = sorted(order[held:].tolist()), sorted(order[:held].tolist())
    if callable(getattr(data, "subset", None)):  # keeps a TensorImages' fast batches
        return data.subset(train), data.subset(rest)
    return Subset(data, train), Subset(data, rest)


def splittable(data: Any) -> bool:
    """Whether `holdout_split` can split ``data``: a map-style dataset, not a DataLoader or a list of batches."""
    return (
        not isinstance(data, DataLoader)
        and not is_batch_list(data)
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
    )


class BestEpoch:
    """Tracks each stitch's held-out accuracy after every epoch and keeps its best state.

    Epoch 0 is the state before training (e.g. the least-squares start), so
    training can never make the kept stitch worse on the held-out data. Ties
    go to the lower held-out loss, then to the earlier epoch. With
    ``recipe.patience``, a stitch whose score has not improved for that many
    evaluations in a row is no longer ``active`` (and is no longer evaluated);
    with ``recipe.min_delta``, only a rise in accuracy of at least that much
    counts as an improvement for that count.
    Extra keywords (``loss_fn``, ``batch_fn``, ``num_workers``) go to
    `evaluate_stitches`.
    """

    def __init__(
        self,
        models: Sequence[StitchedModel],
        held: Any,
        *,
        recipe: Recipe,
        device: torch.device,
        batch_size: int,
        **evaluate_options: Any,
    ) -> None:
        self.models, self.held, self.recipe = list(models), held, recipe
        self.device, self.batch_size, self.options = device, batch_size, evaluate_options
        self.best: list[tuple[float, float]] = [(-math.inf, -math.inf)] * len(self.models)
        self.epochs = [0] * len(self.models)
        self.states: list[dict[str, torch.Tensor] | None] = [None] * len(self.models)
        self.active = [True] * len(self.models)  # which stitches still train (all, without recipe.patience)
        self.counted = [(-math.inf, 0)] * len(self.models)  # (accuracy, epoch) of the last counted improvement
        self.history: list[list[float]] = [[] for _ in self.models]  # held-out accuracy at each evaluation

    def __call__(self, epoch: int) -> None:
        """Evaluate the active stitches on the held-out data; remember the states that improved."""
        indices = [i for i, on in enumerate(self.active) if on]
        results = evaluate_stitches(
            [self.models[i] for i in indices],
            self.held,
            device=self.device,
            batch_size=self.batch_size,
            recipe=self.recipe,
            what="the held-out part of the training data",
            **self.options,
        )
        patience, delta = self.recipe.patience, self.recipe.min_delta
        for i, result in zip(indices, results):
            self.history[i].append(result["accuracy"])
            score = (result["accuracy"], -result["loss"])
            improved = score > self.best[i]
            if improved:
                self.best[i], self.epochs[i] = score, epoch
                self.states[i] = {k: v.detach().clone() for k, v in self.models[i].stitch.state_dict().items()}
            if improved if delta == 0 else result["accuracy"] >= self.counted[i][0] + delta:
                self.counted[i] = (result["accuracy"], epoch)
            if patience is not None and epoch - self.counted[i][1] >= patience:
                self.active[i] = False

    def convergence(self, i: int) -> str:
        """How stitch ``i``'s training ended: ``"start"`` (the kept state is the one before training),
        ``"rising"`` (its held-out accuracy at the last epoch it trained beat every earlier one by at least
        `RISING`: more epochs may raise it further) or ``"settled"`` (it did not)."""
        if self.epochs[i] == 0:
            return "start"
        *before, last = self.history[i]
        return "rising" if before and last >= max(before) + RISING else "settled"

    def restore(self) -> None:
        """Load each stitch's best state back."""
        for model, state in zip(self.models, self.states):
            if state is not None:
                model.stitch.load_state_dict(state)
