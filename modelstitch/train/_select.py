"""Held-out selection: split off part of the training data and keep each stitch's best epoch on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .._errors import StitchError
from ..core import is_batch_list, resolve_device
from ..stitches import StitchedModel
from ._evaluate import evaluate_stitches
from ._recipe import Recipe

__all__ = ["MIN_HOLDOUT", "RISING", "RISING_Z", "BestEpoch", "holdout_size", "holdout_split", "splittable"]

MIN_HOLDOUT = 256
"""`holdout_split` holds out at least this many samples (up to a quarter of the data): choosing among a
stitch's states on a few dozen samples picks noise (a self-stitch of a random GPT-2 on 96 sequences, 4 of them
held out, lost 2.3 points of test accuracy to a state that won on them)."""

#: A stitch whose held-out accuracy at its last check beat every earlier check (and its start) by at least this
#: much, and by more than the held-out sample's noise (`RISING_Z`), is flagged ``"rising"``: possibly
#: under-trained. A smaller rise, or a lower loss alone, is noise here.
RISING = 0.01

#: The rise must also pass a paired sign test against the best earlier check: with ``n10`` held-out
#: predictions right at the last check and wrong at that one, and ``n01`` the reverse, ``n10 - n01`` must be at
#: least this many standard deviations ``sqrt(n10 + n01)``. On 256 held-out images a point is 2.6 images, well
#: within what two states that differ in a few dozen predictions move by chance.
RISING_Z = 2.0


def holdout_split(data: Any, fraction: float, *, seed: int) -> tuple[Any, Dataset | None]:
    """Split a map-style dataset into a training part and a held-out part (a seeded random split).

    Args:
        data: a map-style Dataset (anything with ``__getitem__`` and ``__len__``).
        fraction: share of the samples held out, in ``[0, 1)``; ``0`` holds out nothing. At least
            `MIN_HOLDOUT` samples are held out, or a quarter of the data where that is fewer (but never
            fewer than ``fraction`` asks for).
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
        >>> len(train), len(held)  # a quarter of 20: under MIN_HOLDOUT
        (15, 5)
        >>> [len(part) for part in holdout_split(TensorDataset(torch.arange(4000)), 0.05, seed=0)]
        [3744, 256]
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
    held = holdout_size(n, fraction)
    if n - held < 1:
        raise StitchError(f"Recipe(holdout={fraction}) leaves no training samples out of {n}; use a lower holdout")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    train, rest = sorted(order[held:].tolist()), sorted(order[:held].tolist())
    if callable(getattr(data, "subset", None)):  # keeps a TensorImages' fast batches
        return data.subset(train), data.subset(rest)
    return Subset(data, train), Subset(data, rest)


def holdout_size(n: int, fraction: float) -> int:
    """How many of ``n`` samples `holdout_split` holds out for a ``fraction`` > 0: at least one, ``fraction``
    of them, and at least `MIN_HOLDOUT` (or a quarter of ``n`` where that is fewer).

    Examples:
        >>> holdout_size(20, 0.15), holdout_size(1437, 0.05), holdout_size(50_000, 0.05)
        (5, 256, 2500)
    """
    return max(1, math.floor(n * fraction), min(MIN_HOLDOUT, n // 4))


def splittable(data: Any) -> bool:
    """Whether `holdout_split` can split ``data``: a map-style dataset, not a DataLoader or a list of batches."""
    return (
        not isinstance(data, DataLoader)
        and not is_batch_list(data)
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
    )


class BestEpoch:
    """Tracks each stitch's held-out loss and accuracy at every check and keeps its best state.

    A check is labelled with the epochs trained so far; epoch 0 is the state
    before training (e.g. the least-squares start), so training can never
    make the kept stitch worse on the held-out data. The best state is the
    one of lowest held-out loss (ties: higher accuracy, then the earlier
    check). On a few hundred held-out samples accuracy is a noisy ranking:
    choosing by it kept the least-squares start of a cifar-small cell
    (R1111 ``layer3.0`` -> R1211 ``layer3.0``, 256 held out) that training
    beat by 2.5 points or more on the test data; the loss, which training
    lowers, ranks the states by what changed. With ``recipe.patience``, a
    stitch whose score has not improved for that many epochs is no longer
    ``active`` (and is no longer evaluated); with ``recipe.min_delta``, only
    a rise in accuracy of at least that much counts as an improvement for
    that count.
    Extra keywords (``loss_fn``, ``batch_fn``, ``num_workers``) go to
    `evaluate_stitches`. The models are moved to ``device`` once, here.
    """

    def __init__(
        self,
        models: Sequence[StitchedModel],
        held: Any,
        *,
        recipe: Recipe,
        device: str | torch.device,
        batch_size: int,
        **evaluate_options: Any,
    ) -> None:
        self.models, self.held, self.recipe = list(models), held, recipe
        self.device, self.batch_size, self.options = resolve_device(device), batch_size, evaluate_options
        for m in self.models:  # once: every check evaluates them where they are
            m.to(self.device)
        self.best: list[tuple[float, float]] = [(-math.inf, math.inf)] * len(self.models)  # (accuracy, loss)
        self.epochs: list[float] = [0] * len(self.models)
        self.states: list[dict[str, torch.Tensor] | None] = [None] * len(self.models)
        self.active = [True] * len(self.models)  # which stitches still train (all, without recipe.patience)
        self.counted: list[tuple[float, float]] = [(-math.inf, 0)] * len(self.models)  # the last counted improvement
        self.history: list[list[float]] = [[] for _ in self.models]  # held-out accuracy at each evaluation
        self.loss_history: list[list[float]] = [[] for _ in self.models]  # and held-out loss
        self.correct: list[list[torch.Tensor]] = [[] for _ in self.models]  # and which predictions were right

    def __call__(self, epoch: float, indices: Sequence[int] | None = None) -> None:
        """Evaluate the active stitches (of ``indices``: all by default) on the held-out data after ``epoch``
        epochs; remember the states that improved."""
        indices = [i for i in (range(len(self.models)) if indices is None else indices) if self.active[i]]
        results = evaluate_stitches(
            [self.models[i] for i in indices],
            self.held,
            device=self.device,
            move=False,  # moved once, in __init__
            batch_size=self.batch_size,
            recipe=self.recipe,
            what="the held-out part of the training data",
            per_sample=True,
            **self.options,
        )
        patience, delta = self.recipe.patience, self.recipe.min_delta
        for i, result in zip(indices, results):
            self.history[i].append(result["accuracy"])
            self.loss_history[i].append(result["loss"])
            self.correct[i].append(result["correct"])
            score = (result["accuracy"], result["loss"])
            improved = (-score[1], score[0]) > (-self.best[i][1], self.best[i][0])
            if improved:
                self.best[i], self.epochs[i] = score, epoch
                self.states[i] = {k: v.detach().clone() for k, v in self.models[i].stitch.state_dict().items()}
            if improved if delta == 0 else result["accuracy"] >= self.counted[i][0] + delta:
                self.counted[i] = (result["accuracy"], epoch)
            if patience is not None and epoch - self.counted[i][1] >= patience:
                self.active[i] = False

    def convergence(self, i: int) -> str:
        """How stitch ``i``'s training ended: ``"start"`` (the kept state is the one before training),
        ``"rising"`` (its held-out accuracy at its last check beat every earlier one by at least `RISING`, and
        the best earlier one by more than chance, `RISING_Z`: more epochs may raise it further) or
        ``"settled"`` (it did not)."""
        if self.epochs[i] == 0:
            return "start"
        *before, last = self.history[i]
        if not before or last < max(before) + RISING:
            return "settled"
        now, then = self.correct[i][-1], self.correct[i][before.index(max(before))]
        gained, lost = int((now & ~then).sum()), int((then & ~now).sum())
        return "rising" if gained - lost >= RISING_Z * math.sqrt(gained + lost) else "settled"

    def restore(self) -> None:
        """Load each stitch's best state back."""
        for model, state in zip(self.models, self.states):
            if state is not None:
                model.stitch.load_state_dict(state)
