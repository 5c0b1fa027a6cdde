"""Training and evaluating zoo networks as classifiers (through the library's one loop)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._errors import StitchError
from ..core import as_loader, call_model, iterate_batches, resolve_device
from ..train import Recipe, Task, evaluate, optimise, task_of, total_steps
from ._resnet import _check_positive_int

__all__ = ["CLASSIFIER_RECIPE", "evaluate_classifier", "train_classifier"]

CLASSIFIER_RECIPE = Recipe(
    lr=0.1,
    base_batch_size=128,
    batch_size=128,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    epochs=30,
    warmup=0.05,
    channels_last=True,
)
"""Recipe for training a zoo model from scratch on CIFAR-10.

SGD with Nesterov momentum 0.9, learning rate 0.1 at batch size 128, weight
decay 5e-4, 30 epochs, 5% linear warmup then cosine decay, bfloat16 autocast
and channels-last on CUDA. With random-crop and flip augmentation
(``modelstitch.data.cifar10(..., augment=True)``) this is the standard recipe
that takes CIFAR ResNets past 90% test accuracy.
"""


def train_classifier(
    model: nn.Module,
    train_data: Dataset[Any] | DataLoader[Any],
    *,
    recipe: Recipe = CLASSIFIER_RECIPE,
    test_data: Dataset[Any] | DataLoader[Any] | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train ``model`` on its task with cross entropy (in place): a classifier, or a language model.

    The task is `modelstitch.train.task_of` the model: class labels for a
    classifier; next-token prediction for a causal language model (labels
    are its ``input_ids``, shifted; a dataset of token dicts needs no labels).

    Uses ``recipe.optimizer`` over the trainable parameters and steps
    ``recipe.scheduler`` once per batch. Where ``recipe.uses_amp(device)`` the
    forward runs under `torch.autocast` with ``recipe.amp_dtype`` (float16 also
    gets a gradient scaler); otherwise in float32. Gradients are
    clipped to ``recipe.grad_clip`` when set.

    Given a Dataset, batches of ``recipe.batch_size`` are drawn in an order
    seeded by ``recipe.seed`` (the last incomplete batch of each epoch is
    dropped). Given a DataLoader, it is used as it is (its own order) and the
    learning rate is scaled to its ``batch_size``. The global torch RNG is
    seeded with ``recipe.seed`` for the run (so random augmentation in the
    main process repeats too) and restored afterwards.

    Args:
        model: maps ``[B, ...]`` inputs to ``[B, num_classes]`` logits (or a
            language model: ``{"input_ids": [B, T]}`` to ``[B, T, vocab]``). It is
            moved to ``device`` and stays there; with ``recipe.channels_last``
            it is also converted to channels-last.
        train_data: Dataset or DataLoader yielding ``(inputs, labels)`` with
            int64 labels ``[B]``.
        recipe: optimiser, schedule, epochs (may be fractional), numerics and
            seed; defaults to `CLASSIFIER_RECIPE`.
        test_data: if given, evaluated once after training.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        progress: show a tqdm progress bar.
        num_workers: DataLoader worker processes when ``train_data`` or
            ``test_data`` is a Dataset.

    Returns:
        ``{"train_loss": mean loss over the last epoch, "test_accuracy":
        float in [0, 1] or None, "test_loss": mean test cross entropy (nats)
        or None, "epochs": recipe.epochs, "steps": optimiser steps taken}``.

    Raises:
        StitchError: bad data, or the loss became NaN or infinite (the message
            names the step).

    The model is left in eval mode, also when training fails.
    """
    if not isinstance(recipe, Recipe):
        raise StitchError(f"train_classifier: recipe must be a modelstitch Recipe, got {type(recipe).__name__}")
    dev = resolve_device(device)
    train_loader = as_loader(
        train_data,
        what="train_data",
        batch_size=recipe.batch_size,
        shuffle=True,
        seed=recipe.seed,
        num_workers=num_workers,
        drop_last=True,
    )
    if isinstance(train_data, DataLoader) and train_loader.batch_size and train_loader.batch_size != recipe.batch_size:
        recipe = recipe.replace(batch_size=train_loader.batch_size)
    steps_per_epoch = len(train_loader)
    steps = total_steps(recipe.epochs, steps_per_epoch)
    model.to(dev)
    if recipe.uses_channels_last(dev):
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StitchError("train_classifier: the model has no trainable parameters")
    task = task_of(model)
    batches = _epochs(train_loader, dev, recipe.uses_channels_last(dev), task)

    def step_losses() -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        x, y = next(batches)
        with recipe.autocast(dev):
            output = call_model(model, x)
        yield [0], [task.loss(output, y) if task.causal or isinstance(x, dict) else F.cross_entropy(output.float(), y)]

    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(recipe.seed)
            model.train()
            (epoch_losses,) = optimise(
                [params],
                step_losses,
                recipe=recipe,
                device=dev,
                total_steps=steps,
                steps_per_epoch=steps_per_epoch,
                progress=progress,
                describe=lambda _: f"train_classifier ({type(model).__name__})",
            )
    finally:
        model.eval()

    tested = {"accuracy": None, "loss": None}
    if test_data is not None:
        tested = evaluate_classifier(
            model, test_data, device=dev, batch_size=max(recipe.batch_size, 256), num_workers=num_workers
        )
    return {
        "train_loss": epoch_losses[-1],
        "test_accuracy": tested["accuracy"],
        "test_loss": tested["loss"],
        "epochs": recipe.epochs,
        "steps": steps,
    }


def _epochs(loader: Any, device: torch.device, channels_last: bool, task: Task) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(inputs, labels)`` batches on ``device``, epoch after epoch, forever (a causal LM's labels: its ids)."""
    while True:
        for x, y in iterate_batches(loader, device, channels_last=channels_last, what="the training data"):
            y = task.labels_for(x, y)
            if y is None:
                raise StitchError("train_data must yield (inputs, labels) pairs; it yields inputs only")
            yield x, y


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    data: Dataset[Any] | DataLoader[Any],
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross entropy of a classifier, in float32.

    The model runs in eval mode; its previous mode is restored afterwards.
    It is moved to ``device`` and stays there.

    Args:
        model: maps ``[B, ...]`` inputs to ``[B, num_classes]`` logits.
        data: Dataset or DataLoader yielding ``(inputs, labels)``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        batch_size: batch size when ``data`` is a Dataset.
        num_workers: DataLoader workers when ``data`` is a Dataset.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": mean cross entropy}``.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
        >>> from modelstitch.zoo import small_resnet
        >>> sorted(evaluate_classifier(small_resnet("R1111", width=4), data, device="cpu"))
        ['accuracy', 'loss']
    """
    return evaluate(
        model, data, device=device, batch_size=_check_positive_int(batch_size, "batch_size"), num_workers=num_workers
    )
