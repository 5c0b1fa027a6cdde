"""Training stitches: `train_stitch` and `train_stitches` (many cells in one pass over the data).

Several stitched models can train in one pass over the data. The frozen
senders run once per batch for all their requested layers (or once per
dataset, with ``cache=True``); with ``share_suffix=True`` models that share a
receiver layer run the receiver's suffix once on their stitch outputs
concatenated along the batch. Each model keeps its own optimiser, schedule
and loss, so the result equals training them one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .._errors import StitchError, StitchWarning
from ..core import BatchFn, as_loader, batch_rows, is_batch_list, iterate_batches, resolve_device, split_batch
from ..stitches import JointLeastSquares, StitchedModel, fit_least_squares_all, identity_
from ._cache import ActivationCache
from ._loop import optimise, total_steps
from ._plan import OBJECTIVES, LossFn, Plan
from ._precondition import Preconditioner
from ._recipe import Recipe
from ._select import BestEpoch, holdout_split, splittable

__all__ = [
    "MIN_STEPS",
    "MIN_WHITENED_STEPS",
    "Objective",
    "TrainResult",
    "start_stitches",
    "train_stitch",
    "train_stitches",
]

_FIT_BATCH = 256
"""Samples per batch of the least-squares pass (and of a cache fill from a Dataset, which makes that pass)."""

Objective = Literal["task", "mse", "kl"]

MIN_STEPS = 75
"""Fewer plain optimiser steps than this draw a `StitchWarning` (measured: see docs/trust.md, "How many steps")."""

MIN_WHITENED_STEPS = 18
"""The same for a call whose stitches all take whitened steps (`Recipe.precondition` after a least-squares start)."""

# What the trust page's steps sweep measured (mean accuracy of R1111 -> R1211 per doubling of the steps);
# each floor is the step count from which one more doubling added less than 2 points. The whitened floor is
# the default recipe's at batch 64 (version 0.3; at batch 32, version 0.4's, 9 steps already pass that rule, so
# the floor stays at the more cautious 18), the plain one version 0.2's (momentum 0.9 at learning rate 0.01).
_STEP_FLOORS = {
    True: (MIN_WHITENED_STEPS, "whitened", "3.0 to 5.2 points with each doubling up to 18 steps at batch 64"),
    False: (MIN_STEPS, "plain", "2.4 to 5.1 points with each doubling up to 76 steps, 1.5 from 76 to 152"),
}


@dataclasses.dataclass
class TrainResult:
    """What one stitch's training did.

    Attributes:
        epoch_losses: mean training loss of each epoch.
        steps: optimiser steps taken (more for a stitch that upsamples a lot,
            see `Recipe.upsampled_epochs_factor`; fewer when
            `Recipe.patience` stopped it).
        seconds: wall-clock time of the whole call (shared by models trained together).
        objective: ``"task"``, ``"mse"`` or ``"kl"``.
        selected_epoch: the epochs trained (to 2 decimals) when the kept
            state was checked (0: the state before training), or ``None``
            without held-out selection (the last state is kept).
        holdout_accuracy: the kept state's accuracy on the held-out data, or ``None``.
        convergence: with held-out selection, ``"start"`` when the kept state
            is the start (training never beat it on the held-out data),
            ``"rising"`` when its held-out accuracy at its last check beat every
            earlier check and the start by at least a point (`train.RISING`:
            the stitch may be under-trained, more epochs may help) and
            ``"settled"`` otherwise; ``None`` without held-out data.
    """

    epoch_losses: list[float]
    steps: int
    seconds: float
    objective: str
    selected_epoch: float | None = None
    holdout_accuracy: float | None = None
    convergence: str | None = None

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last epoch."""
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def train_stitch(
    stitched: StitchedModel,
    data: Any,
    *,
    objective: Objective = "task",
    recipe: Recipe | None = None,
    **options: Any,
) -> TrainResult:
    """Train ``stitched.stitch`` with the sender and receiver frozen.

    A stitch made by ``stitch(...)`` with its default ``init="auto"`` first
    gets the start ``recipe.init`` names (with the default ``Recipe()``, its
    least-squares fit on the training part), so this call with its defaults
    is the recipe a `Study` runs; a start fixed at `stitch` is kept.

    Args:
        stitched: from `stitch`.
        data: a Dataset or DataLoader of ``(inputs, labels)`` (see `split_batch`
            for dicts and ``batch_fn``).
        objective: ``"task"``: ``loss_fn(stitched(x), y)``, by default the
            receiver's own task loss (`Task.loss`: cross entropy on logits; for
            a causal language model, next-token cross entropy with the labels
            shifted, padding and ``-100`` left out, and the labels taken from
            ``input_ids`` when the data has none); ``"mse"``: mean squared
            error between the stitch's output and the receiver's expected
            representation ``B<=j(x)``; ``"kl"``: ``KL(receiver ‖ stitched)``
            of the output distributions, per sample (and per unpadded
            position), so the stitch reproduces what the receiver itself
            predicts. ``"mse"`` and ``"kl"`` use no labels.
        recipe: optimiser, schedule, batch size, epochs and seed;
            ``Recipe()`` by default (`Recipe.paper` is the paper's). A DataLoader's own batch size
            replaces ``recipe.batch_size`` (and scales the learning rate).
        **options: ``loss_fn``, ``batch_fn``, ``device``, ``progress``,
            ``cache``, ``memory_budget``, as for `train_stitches`.

    Returns:
        A `TrainResult`.

    Raises:
        StitchError: the loss became NaN or infinite (naming the step and the
            cell), or the data cannot be read.
    """
    return train_stitches([stitched], data, objective=objective, recipe=recipe, **options)[0]


def train_stitches(
    models: Sequence[StitchedModel],
    data: Any,
    *,
    objective: Objective = "task",
    recipe: Recipe | None = None,
    loss_fn: LossFn | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    cache: bool = False,
    memory_budget: int = 2 * 1024**3,
    num_workers: int = 0,
    share_suffix: bool = False,
    cache_dtype: torch.dtype | None = None,
    holdout: Any = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[TrainResult]:
    """Train several stitches in one pass over the data; each as if trained alone.

    Args:
        models: stitched models; they may share senders and receivers.
        data: as for `train_stitch`.
        objective: ``"task"``, ``"mse"`` or ``"kl"`` (see `train_stitch`).
        recipe: as for `train_stitch`; the same recipe (and data order) for all.
        loss_fn: ``(receiver_output, labels) -> scalar`` for ``"task"``;
            default the receiver's `Task.loss`.
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...; the
            stitched models (with their networks) are moved there, and
            converted to channels-last when ``recipe.uses_channels_last``.
        progress: show a tqdm progress bar.
        cache: compute the frozen senders' activations (and the inputs and
            labels) once, then train from the cache. Right only when the data
            has no random augmentation. From a Dataset the same pass fits
            the least-squares starts (`JointLeastSquares`), so without
            autocast each sample runs through its senders once.
        memory_budget: bytes of cache to keep in memory (on ``device``);
            the rest goes to memory-mapped files in a temporary directory.
        cache_dtype: store cached activations in this floating dtype (e.g.
            ``torch.bfloat16``); ``None`` keeps the dtype they come in (that of
            the recipe's numerics).
        num_workers: DataLoader workers when ``data`` is a Dataset.
        share_suffix: run the receiver's suffix once per step for all models
            that stitch into the same receiver layer, on their stitch outputs
            concatenated along the batch. Results are the same either way.
            On 2 CPU cores it made the default recipe's batches of 32 faster
            on the small ResNets of the ``quick`` and ``cifar-small`` presets
            (which turn it on), and the paper recipe's batches of 64 by less
            than their time moves between runs (docs/performance.md, "Sharing
            the suffix"); it holds the activations of all the layer's models
            at once, so it is off by default.
        holdout: data to choose each stitch's best epoch on (``task``
            objective only); by default, with ``recipe.holdout > 0``, that
            share of ``data`` is split off (see `holdout_split`) and not
            trained on. Each stitch ends in its best state.
        on_step: called with ``(steps done, total steps)`` after every
            optimiser step (a `Study` moves its per-cell progress bar with it).

    Returns:
        One `TrainResult` per model, in order.
    """
    if not models:
        return []
    if objective not in OBJECTIVES:
        raise StitchError(
            f"objective={objective!r}: use 'task' (the receiver's loss through it), 'mse' (its representation) "
            "or 'kl' (its own output distribution)"
        )
    recipe = recipe or Recipe()
    dev = resolve_device(device)
    if holdout is None and objective == "task" and recipe.holdout > 0:
        if splittable(data):
            data, holdout = holdout_split(data, recipe.holdout, seed=recipe.seed)
        else:
            warnings.warn(
                f"Recipe(holdout={recipe.holdout}) picks the best epoch on held-out training data, which needs a "
                "map-style Dataset to split; with a DataLoader or an iterable the last epoch is kept. Pass the "
                "Dataset, pass holdout=<data> yourself, or use Recipe(holdout=0) to silence this",
                StitchWarning,
                stacklevel=3,
            )
    for m in models:
        if not isinstance(m, StitchedModel):
            raise StitchError(f"train_stitches takes StitchedModels from modelstitch.stitch(), got {type(m).__name__}")
        m.to(dev)
        if recipe.uses_channels_last(dev):
            m.to(memory_format=torch.channels_last)
    # the cache holds every sample (its batches are drawn later), filled from a Dataset in batches as large as the
    # least-squares pass's, which it makes too; live training drops each epoch's last partial batch
    fills_dataset = cache and splittable(data)
    loader = as_loader(
        data,
        batch_size=max(_FIT_BATCH, recipe.batch_size) if fills_dataset else recipe.batch_size,
        shuffle=not cache,
        seed=recipe.seed,
        num_workers=num_workers,
        drop_last=not cache,
    )
    batch_size = recipe.batch_size if fills_dataset else getattr(loader, "batch_size", None) or recipe.batch_size
    if batch_size != recipe.batch_size:
        recipe = recipe.replace(batch_size=batch_size)
    plan = Plan(models, objective, loss_fn, share_suffix, positions=recipe.positions)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_restored_on_error(models))
        for m in models:
            stack.enter_context(m.frozen())
            stack.callback(m.stitch.eval)  # stitches are left in eval mode, trained or not
        if cache:
            # the least-squares starts are fitted in the pass that fills the cache (from a Dataset, in its order)
            starts = [m for m in models if m.init == "auto"] if fills_dataset and recipe.init == "lstsq" else []
            fit = JointLeastSquares(starts, dev, recipe.positions) if starts else None
            store = stack.enter_context(
                _fill_cache(plan, loader, dev, batch_fn, memory_budget, progress, recipe, cache_dtype, fit)
            )
            if fit is not None:
                fit.solve()
            batches = _cached_batches(plan, store, recipe)
            steps_per_epoch = store.rows // recipe.batch_size if store.rows > recipe.batch_size else 1
        else:
            batches = _live_batches(plan, loader, dev, batch_fn, recipe)
            try:
                steps_per_epoch = len(loader)  # type: ignore[arg-type]
            except TypeError:
                raise StitchError("training needs data of known length: a map-style Dataset or a DataLoader") from None
            if steps_per_epoch == 0:  # e.g. drop_last with fewer samples than a batch: would loop forever
                raise StitchError("the training data yields no batches (fewer samples than one batch with drop_last?)")
        start_stitches([m for m in models if m.init == "auto"], data, recipe=recipe, device=dev, batch_fn=batch_fn)
        # whitened steps for the stitches that started from least squares (it measured their input moments)
        stitches = [m.stitch for m in models]
        precondition = (
            Preconditioner(stitches, dev, damping=[recipe.damping_for(s) for s in stitches])
            if recipe.precondition
            else None
        )
        total = total_steps(recipe.epochs, steps_per_epoch)
        floor, kind, measured = _STEP_FLOORS[precondition is not None and len(precondition) == len(models)]
        if total < floor:
            warnings.warn(
                f"{len(models)} stitch(es) get only {total} optimiser steps ({steps_per_epoch} per epoch); below "
                f"{floor} {kind} steps a stitch is far from trained (measured on the quick preset's R1111 -> R1211 "
                f"with the default recipe, docs/trust.md 'How many steps': the mean cell accuracy rose {measured}). "
                "Use more epochs, a smaller batch or more data",
                StitchWarning,
                stacklevel=3,
            )

        select = None
        if holdout is not None:
            select = BestEpoch(
                models,
                holdout,
                recipe=recipe,
                device=dev,
                batch_size=max(256, recipe.batch_size),
                loss_fn=loss_fn,
                batch_fn=batch_fn,
                num_workers=num_workers,
            )
            select(0)
        elif recipe.patience is not None:
            warnings.warn(
                f"Recipe(patience={recipe.patience}) stops a stitch by its held-out score, but there is no held-out "
                "data (Recipe(holdout=0), or the 'mse' objective): every stitch trains for all epochs",
                StitchWarning,
                stacklevel=3,
            )
        active = select.active if select is not None else [True] * len(models)
        # each stitch's own schedule (longer for one that upsamples a lot), and the steps at which it is checked
        totals = [total_steps(recipe.epochs_for(m.stitch), steps_per_epoch) for m in models]
        checks = [_check_steps(t, steps_per_epoch) for t in totals]
        taken = list(totals)  # steps each stitch took (fewer when recipe.patience stops it)

        def step_losses() -> Iterator[tuple[list[int], list[torch.Tensor]]]:
            reps, x, y = next(batches)
            return plan.group_losses(reps, x, y, recipe.autocast(dev), active)

        def after_step(done: int, longest: int) -> None:
            due = [i for i, steps in enumerate(checks) if done in steps and active[i]]
            if select is not None and due:
                select(round(done / steps_per_epoch, 2), due)
                taken[:] = [done if i in due and not active[i] else t for i, t in enumerate(taken)]
            if on_step is not None:
                on_step(done, longest)

        for s in stitches:
            s.train()
        losses = optimise(
            [s.parameters() for s in stitches],
            step_losses,
            recipe=recipe,
            device=dev,
            total_steps=totals,
            steps_per_epoch=steps_per_epoch,
            progress=progress,
            describe=lambda i: f"the cell {models[i].cell}",
            on_step=after_step,
            active=active,
            before_step=precondition or None,  # an empty one (no stitch has moments) is not called each step
            lrs=[recipe.lr_for(s) for s in stitches],
        )
        if select is not None:
            select.restore()
    seconds = time.perf_counter() - start
    if select is None:
        return [TrainResult(epoch_losses, t, seconds, objective) for epoch_losses, t in zip(losses, totals)]
    return [
        TrainResult(epoch_losses, t, seconds, objective, epoch, accuracy, select.convergence(i))
        for i, (epoch_losses, t, epoch, (accuracy, _)) in enumerate(zip(losses, taken, select.epochs, select.best))
    ]


def _check_steps(total: int, steps_per_epoch: int) -> set[int]:
    """The steps after which a stitch's held-out score is checked: each epoch's end and the schedule's end,
    and half-way through a schedule of one epoch or less (so that "still rising" can be told apart from
    "rose from its start").

    Examples:
        >>> sorted(_check_steps(59, 59)), sorted(_check_steps(118, 59)), sorted(_check_steps(150, 59))
        ([30, 59], [59, 118], [59, 118, 150])
    """
    steps = {*range(steps_per_epoch, total, steps_per_epoch), total}
    if len(steps) == 1 and total > 1:
        steps.add(math.ceil(total / 2))
    return steps


@contextlib.contextmanager
def _restored_on_error(models: Sequence[StitchedModel]) -> Iterator[None]:
    """Put every stitch back as it was (weights and start) when training fails: nothing is left half-trained."""
    saved = [({k: v.detach().clone() for k, v in m.stitch.state_dict().items()}, m.init) for m in models]
    try:
        yield
    except BaseException:
        for m, (state, init) in zip(models, saved):
            m.stitch.load_state_dict(state)
            m.init = init
        raise


def start_stitches(
    models: Sequence[StitchedModel],
    data: Any,
    *,
    recipe: Recipe,
    device: torch.device,
    batch_fn: BatchFn | None = None,
) -> None:
    """Start stitches left at ``init="auto"`` as ``recipe.init`` says, on the training part ``data``.

    ``"lstsq"`` fits every linear stitch in one pass (`fit_least_squares_all`);
    a stitch of another kind keeps its random start, with a `StitchWarning`.
    ``"identity"`` sets linear stitches to the identity where the shapes allow.
    Each model's ``init`` then records the start it got.
    """
    if not models:
        return
    linear = [m for m in models if m.stitch.linear is not None]
    others = [m for m in models if m.stitch.linear is None]
    if recipe.init != "random" and others:
        warnings.warn(
            f"Recipe(init={recipe.init!r}) starts linear stitches only; {len(others)} stitch(es) of kind "
            f"{sorted({m.stitch.kind for m in others})} start at random, which can leave a stitch that exists "
            "unfound (see docs/trust.md), and take plain steps, for which a rate made for whitened ones (the "
            "default's) is far too high; pass stitch(..., init='random') to say that this is meant, with a lower "
            "Recipe(lr=...) or Recipe.paper()",
            StitchWarning,
            stacklevel=4,
        )
    if recipe.init == "lstsq" and linear:
        batch_size = max(_FIT_BATCH, recipe.batch_size)
        fit_least_squares_all(
            linear,
            data,
            batch_fn=batch_fn,
            batch_size=batch_size,
            device=device,
            what="the training data",
            positions=recipe.positions,
        )
    elif recipe.init == "identity":
        for m in linear:
            identity_(m.stitch)
    for m in models:
        m.init = recipe.init if m in linear else "random"


@contextlib.contextmanager
def _fill_cache(
    plan: Plan,
    loader: Iterable,
    dev: torch.device,
    batch_fn: BatchFn | None,
    budget: int,
    progress: bool,
    recipe: Recipe,
    dtype: torch.dtype | None = None,
    fit: JointLeastSquares | None = None,
) -> Iterator[ActivationCache]:
    """Run the frozen computations over ``loader`` once into an `ActivationCache`; feed ``fit`` the same batches
    (the senders' activations it gets where they are computed without autocast, as the fit wants them)."""
    dataset = getattr(loader, "dataset", None)
    try:
        if is_batch_list(loader):  # ready-made batches: count their samples
            capacity = sum(batch_rows(split_batch(b, batch_fn)[0]) or 0 for b in loader)  # type: ignore[union-attr]
        else:
            capacity = len(dataset) if dataset is not None else len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise StitchError(
            "cache=True needs data of known length (a map-style Dataset or a DataLoader over one)"
        ) from None
    with ActivationCache(capacity, memory_budget=budget, device=dev, dtype=dtype) as store:
        position = 0
        batches = iterate_batches(loader, dev, batch_fn, what="the training data")
        for x, y in tqdm(batches, desc="cache", disable=not progress, leave=False):
            with recipe.autocast(dev):
                rows = {**plan.frozen_outputs(x)}
            if fit is not None:
                fit.update(x, None if recipe.uses_amp(dev) else rows)
            if y is not None:
                rows["y"] = y
            if plan.needs_input or isinstance(x, dict):  # token ids and masks are small; labels come from them
                rows.update({f"x:{k}": v for k, v in x.items()} if isinstance(x, dict) else {"x": x})
            for key, value in rows.items():
                store.write(key, position, value)
            position += next(iter(rows.values())).shape[0]
        if position == 0:
            raise StitchError("the training data yields no batches (fewer samples than one batch with drop_last?)")
        yield store


def _cached_batches(plan: Plan, store: ActivationCache, recipe: Recipe) -> Iterator[tuple]:
    generator = torch.Generator().manual_seed(recipe.seed)
    n, b = store.rows, recipe.batch_size
    keys = {*plan.provided_keys, *(plan.expected_keys if plan.objective == "mse" else []), *plan.references}
    inputs = [k for k in store.names() if k.startswith("x:")]
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, max(n - b, 0) + 1, b) if n > b else [0]:
            index = order[start : start + b]
            reps = {k: store.gather(k, index) for k in keys}
            x = store.gather("x", index) if "x" in store else None
            if inputs:
                x = {k[2:]: store.gather(k, index) for k in inputs}
            y = store.gather("y", index) if "y" in store else None
            yield reps, x, y


def _live_batches(plan: Plan, loader: Iterable, dev: torch.device, batch_fn: BatchFn | None, recipe: Recipe):
    while True:
        channels_last = recipe.uses_channels_last(dev)
        batches = iterate_batches(loader, dev, batch_fn, channels_last=channels_last, what="the training data")
        for x, y in batches:
            with recipe.autocast(dev):
                reps = plan.frozen_outputs(x)
            yield reps, x, y
