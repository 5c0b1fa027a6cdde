"""Training and evaluating stitches: `train_stitch`, `train_stitches`, `evaluate`.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._batches import BatchFn, as_loader, iterate_batches
from ._cache import ActivationCache
from ._capture import activations, frozen
from ._device import resolve_device
from ._errors import StitchError
from ._recipe import Recipe
from ._stitched import StitchedModel

__all__ = ["TrainResult", "evaluate", "evaluate_stitches", "stitching_penalty", "train_stitch", "train_stitches"]

Objective = Literal["task", "mse"]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TrainResult:
    """What one stitch's training did.

    Attributes:
        epoch_losses: mean training loss of each epoch.
        steps: optimiser steps taken.
        seconds: wall-clock time of the whole call (shared by models trained together).
        objective: ``"task"`` or ``"mse"``.
    """

    epoch_losses: list[float]
    steps: int
    seconds: float
    objective: str

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

    Args:
        stitched: from `stitch`.
        data: a Dataset or DataLoader of ``(inputs, labels)`` (see `split_batch`
            for dicts and ``batch_fn``).
        objective: ``"task"``: ``loss_fn(stitched(x), y)``, cross entropy by
            default; ``"mse"``: mean squared error between the stitch's output
            and the receiver's expected representation ``B<=j(x)`` (labels are
            not used).
        recipe: optimiser, schedule, batch size, epochs and seed;
            ``Recipe()`` (the paper's) by default. A DataLoader's own batch size
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
) -> list[TrainResult]:
    """Train several stitches in one pass over the data; each as if trained alone.

    Args:
        models: stitched models; they may share senders and receivers.
        data: as for `train_stitch`.
        objective: ``"task"`` or ``"mse"``.
        recipe: as for `train_stitch`; the same recipe (and data order) for all.
        loss_fn: ``(receiver_output, labels) -> scalar`` for ``"task"``;
            default cross entropy on logits.
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...; the
            stitched models (with their networks) are moved there, and
            converted to channels-last when ``recipe.channels_last``.
        progress: show a tqdm progress bar.
        cache: compute the frozen senders' activations (and the inputs and
            labels) once, then train from the cache. Right only when the data
            has no random augmentation.
        memory_budget: bytes of cache to keep in memory (on ``device``);
            the rest goes to memory-mapped files in a temporary directory.
        num_workers: DataLoader workers when ``data`` is a Dataset.
        share_suffix: run the receiver's suffix once per step for all models
            that stitch into the same receiver layer, on their stitch outputs
            concatenated along the batch. Results are the same either way; on
            2 CPU cores the concatenated batch was measured about a third slower
            (see the performance page), so it is off by default. It may pay
            off on a GPU, where larger batches use the device better.

    Returns:
        One `TrainResult` per model, in order.
    """
    if not models:
        return []
    if objective not in ("task", "mse"):
        raise StitchError(f"objective={objective!r}: use 'task' (cross entropy through the receiver) or 'mse'")
    recipe = recipe or Recipe()
    dev = resolve_device(device)
    for m in models:
        if not isinstance(m, StitchedModel):
            raise StitchError(f"train_stitches takes StitchedModels from modelstitch.stitch(), got {type(m).__name__}")
        m.to(dev)
        if recipe.channels_last:
            m.to(memory_format=torch.channels_last)
    # the cache holds every sample (its batches are drawn later); live training drops each epoch's last partial batch
    loader = as_loader(
        data,
        batch_size=recipe.batch_size,
        shuffle=not cache,
        seed=recipe.seed,
        num_workers=num_workers,
        drop_last=not cache,
    )
    batch_size = getattr(loader, "batch_size", None) or recipe.batch_size
    if batch_size != recipe.batch_size:
        recipe = recipe.replace(batch_size=batch_size)
    plan = _Plan(models, objective, loss_fn or _cross_entropy, share_suffix)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(m.frozen())
        if cache:
            store = stack.enter_context(_fill_cache(plan, loader, dev, batch_fn, memory_budget, progress, recipe))
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
        total = max(1, math.ceil(recipe.epochs * steps_per_epoch))
        results = _optimise(plan, batches, recipe, dev, total, steps_per_epoch, progress)
    seconds = time.perf_counter() - start
    return [TrainResult(losses, steps, seconds, objective) for losses, steps in results]


def _cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise StitchError(
            f"the receiver returns {type(output).__name__}, not logits; pass loss_fn=lambda output, labels: ..."
        )
    return F.cross_entropy(output.float(), labels)


class _Plan:
    """Which frozen computations the models need, shared where possible."""

    def __init__(
        self, models: Sequence[StitchedModel], objective: str, loss_fn: LossFn, share_suffix: bool = False
    ) -> None:
        self.models = list(models)
        self.objective = objective
        self.loss_fn = loss_fn
        self.provided_keys = [f"s{id(m.sender)}:{m.sender_prefix.address}" for m in models]
        self.expected_keys = [f"r{id(m.receiver)}:{m.receiver_prefix.address}" for m in models]
        self.sender_layers = _group(
            {k: (m.sender, str(m.sender_prefix.address)) for k, m in zip(self.provided_keys, models)}
        )
        self.receiver_layers = (
            _group({k: (m.receiver, str(m.receiver_prefix.address)) for k, m in zip(self.expected_keys, models)})
            if objective == "mse"
            else {}
        )
        self.needs_input = objective == "task" and any(m.receiver_suffix.needs_input for m in models)
        # with share_suffix, models of one receiver layer run its suffix once, on concatenated stitch outputs
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.expected_keys):
            groups.setdefault(key if share_suffix else str(i), []).append(i)
        self.suffix_groups = list(groups.values())

    def frozen_outputs(self, x: Any) -> dict[str, torch.Tensor]:
        """Provided (and, for "mse", expected) representations of one batch, keyed."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for net, layers in [*self.sender_layers.values(), *self.receiver_layers.values()]:
                acts = activations(net, x, [layer for _, layer in layers])
                out.update({key: acts[layer] for key, layer in layers})
        return out

    def group_losses(
        self, reps: dict[str, torch.Tensor], x: Any, y: torch.Tensor | None, amp: torch.autocast
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Scalar losses, one suffix group at a time (so each group's graph can be freed before the next)."""
        if self.objective == "task" and y is None:
            raise StitchError("the 'task' objective needs labels: the data yields inputs only")
        for group in self.suffix_groups:
            with amp:
                outs = [self.models[i].stitch(reps[self.provided_keys[i]]) for i in group]
                if self.objective == "mse":
                    losses = [F.mse_loss(o.float(), reps[self.expected_keys[i]].float()) for o, i in zip(outs, group)]
                else:
                    suffix = self.models[group[0]].receiver_suffix
                    joined = torch.cat(outs) if len(group) > 1 else outs[0]
                    x_rep = None if not suffix.needs_input else _repeat(x, len(group))
                    result = suffix(joined, x_rep)
                    parts = result.chunk(len(group)) if len(group) > 1 else [result]
                    losses = [self.loss_fn(part, y) for part in parts]
            yield group, losses


def _group(items: dict[str, tuple[nn.Module, str]]) -> dict[int, tuple[nn.Module, list[tuple[str, str]]]]:
    groups: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for key, (net, layer) in items.items():
        groups.setdefault(id(net), (net, []))[1].append((key, layer))
    return groups


def _repeat(x: Any, times: int) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.cat([x] * times)
    raise StitchError("models trained together through a hooked suffix need a plain tensor input")


@contextlib.contextmanager
def _fill_cache(
    plan: _Plan,
    loader: Iterable,
    dev: torch.device,
    batch_fn: BatchFn | None,
    budget: int,
    progress: bool,
    recipe: Recipe,
) -> Iterator[ActivationCache]:
    dataset = getattr(loader, "dataset", None)
    try:
        capacity = len(dataset) if dataset is not None else len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise StitchError(
            "cache=True needs data of known length (a map-style Dataset or a DataLoader over one)"
        ) from None
    with ActivationCache(capacity, memory_budget=budget, device=dev) as store:
        position = 0
        for x, y in tqdm(iterate_batches(loader, dev, batch_fn), desc="cache", disable=not progress, leave=False):
            with _autocast(recipe, dev):
                rows = {**plan.frozen_outputs(x)}
            if y is not None:
                rows["y"] = y
            if plan.needs_input:
                rows["x"] = x
            for key, value in rows.items():
                store.write(key, position, value)
            position += next(iter(rows.values())).shape[0]
        if position == 0:
            raise StitchError("the training data yields no batches (fewer samples than one batch with drop_last?)")
        yield store


def _cached_batches(plan: _Plan, store: ActivationCache, recipe: Recipe) -> Iterator[tuple]:
    generator = torch.Generator().manual_seed(recipe.seed)
    n, b = store.rows, recipe.batch_size
    keys = {*plan.provided_keys, *(plan.expected_keys if plan.objective == "mse" else [])}
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, max(n - b, 0) + 1, b) if n > b else [0]:
            index = order[start : start + b]
            reps = {k: store.gather(k, index) for k in keys}
            x = store.gather("x", index) if "x" in store else None
            y = store.gather("y", index) if "y" in store else None
            yield reps, x, y


def _autocast(recipe: Recipe, dev: torch.device) -> torch.autocast:
    """Mixed precision for the frozen networks and the stitches: on CUDA when ``recipe.amp``."""
    return torch.autocast(
        device_type=dev.type, dtype=getattr(torch, recipe.amp_dtype), enabled=recipe.amp and dev.type == "cuda"
    )


def _live_batches(plan: _Plan, loader: Iterable, dev: torch.device, batch_fn: BatchFn | None, recipe: Recipe):
    while True:
        for x, y in iterate_batches(loader, dev, batch_fn, channels_last=recipe.channels_last):
            with _autocast(recipe, dev):
                reps = plan.frozen_outputs(x)
            yield reps, x, y


def _optimise(
    plan: _Plan,
    batches: Iterator[tuple],
    recipe: Recipe,
    dev: torch.device,
    total: int,
    steps_per_epoch: int,
    progress: bool,
) -> list[tuple[list[float], int]]:
    use_amp = recipe.amp and dev.type == "cuda"
    amp_dtype = getattr(torch, recipe.amp_dtype)
    stitches = [m.stitch for m in plan.models]
    optimizers = [recipe.optimizer(s.parameters()) for s in stitches]
    schedulers = [recipe.scheduler(o, total) for o in optimizers]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    epoch_losses: list[list[float]] = [[] for _ in stitches]
    sums = torch.zeros(len(stitches), dtype=torch.float64)
    count = 0
    for s in stitches:
        s.train()
    try:
        with tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False) as bar:
            for step in range(total):
                reps, x, y = next(batches)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                # backward group by group: only one group's autograd graph is alive at a time
                detached = torch.empty(len(stitches), dtype=torch.float32, device=dev)
                for group, losses in plan.group_losses(reps, x, y, _autocast(recipe, dev)):
                    stacked = torch.stack([loss.float() for loss in losses])
                    detached[group] = stacked.detach()
                    scaler.scale(stacked.sum()).backward()
                values = detached.double().cpu()
                if not torch.isfinite(values).all():
                    bad = int((~torch.isfinite(values)).nonzero()[0])
                    m = plan.models[bad]
                    raise StitchError(
                        f"the loss became {values[bad].item()} at step {step + 1} of {total} for the cell "
                        f"{type(m.sender).__name__}[{m.sender_layer!r}] -> {type(m.receiver).__name__}"
                        f"[{m.receiver_layer!r}]; lower the learning rate, set Recipe(grad_clip=...), or check the data"
                    )
                for s, opt, sched in zip(stitches, optimizers, schedulers):
                    if recipe.grad_clip is not None:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(s.parameters(), recipe.grad_clip)
                    scaler.step(opt)
                    sched.step()
                scaler.update()
                sums += values
                count += 1
                if count == steps_per_epoch or step == total - 1:
                    for i, value in enumerate((sums / count).tolist()):
                        epoch_losses[i].append(value)
                    sums.zero_()
                    count = 0
                bar.update(1)
    finally:
        for s in stitches:
            s.eval()
    return [(losses, total) for losses in epoch_losses]


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
) -> list[dict[str, float]]:
    """Accuracy and mean loss of several classifiers over one pass of ``data``.

    Stitched models that share a sender run it once per batch for all their
    layers. Models are moved to ``device``; modes are restored afterwards.

    Returns:
        One ``{"accuracy": float in [0, 1], "loss": float}`` per model.
    """
    dev = resolve_device(device)
    loss_fn = loss_fn or _cross_entropy
    loader = as_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stitched = [m for m in models if isinstance(m, StitchedModel)]
    plain = [m for m in models if not isinstance(m, StitchedModel)]
    for m in models:
        m.to(dev)
    plan = _Plan(stitched, "task", loss_fn) if stitched else None
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
