"""The one optimisation loop: stitches and classifiers train through `optimise`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._errors import StitchError
from ._recipe import Recipe

__all__ = ["StepLosses", "optimise", "total_steps"]

StepLosses = Callable[[], Iterator[tuple[list[int], list[torch.Tensor]]]]
"""Called once per step: draws a batch and yields ``(indices, scalar losses)`` group by group.

Each group's losses are back-propagated before the next group is computed, so
only one group's autograd graph is alive at a time. ``indices`` say which of
the optimised parameter sets each loss belongs to.
"""


def optimise(
    parameter_sets: Sequence[Iterable[nn.Parameter]],
    step_losses: StepLosses,
    *,
    recipe: Recipe,
    device: torch.device,
    total_steps: int | Sequence[int],
    steps_per_epoch: int,
    progress: bool = False,
    describe: Callable[[int], str] = lambda i: f"model {i}",
    on_step: Callable[[int, int], None] | None = None,
    active: Sequence[bool] | None = None,
    before_step: Callable[[], None] | None = None,
    lrs: Sequence[float] | None = None,
) -> list[list[float]]:
    """Run ``total_steps`` optimiser steps, one optimiser and schedule per parameter set.

    Each set may have a schedule of its own length (``total_steps`` a
    sequence): its warmup and decay span its own steps, and it stops
    training once they are taken.

    Every set gets ``recipe.optimizer`` and ``recipe.scheduler``; with
    float16 autocast (``recipe.amp_dtype``) a gradient scaler;
    gradients are clipped to ``recipe.grad_clip`` when set. A non-finite loss
    stops training before any optimiser steps on it.

    Args:
        parameter_sets: the parameters of each independently trained model.
        step_losses: draws one batch and yields its losses (see `StepLosses`).
        recipe: optimiser, schedule and numerics.
        device: where the losses live.
        total_steps: optimiser steps to take: one number for every set, or
            one per set.
        steps_per_epoch: steps whose losses are averaged into one epoch loss
            (a set's last, shorter epoch is averaged over its own steps).
        progress: show a tqdm bar.
        describe: names parameter set ``i`` in error messages.
        active: which parameter sets still train, read before each step (the
            caller may change it, e.g. in ``on_step``); the
            others are neither stepped nor given more epoch losses, and the
            loop ends early once none is left (``None``: all train). A set
            whose steps are all taken is set to ``False`` here.
        on_step: called with ``(steps done, the longest schedule's steps)``
            after every step, e.g. to move an outer progress bar.
        before_step: called once the step's gradients are all in, before
            clipping and the optimiser steps (e.g. a `Preconditioner`).
        lrs: each set's peak learning rate (default: ``recipe.scaled_lr``
            for every set), e.g. `Recipe.lr_for` of each stitch.

    Returns:
        For each parameter set, the mean training loss of each epoch.

    Raises:
        StitchError: a loss became NaN or infinite (the message names the step
            and the model).
    """
    use_amp = recipe.uses_amp(device)
    peaks = [None] * len(parameter_sets) if lrs is None else list(lrs)
    optimizers = [recipe.optimizer(params, lr) for params, lr in zip(parameter_sets, peaks, strict=True)]
    totals = [total_steps] * len(optimizers) if isinstance(total_steps, int) else list(total_steps)
    longest = max(totals)
    schedulers = [recipe.scheduler(opt, total) for opt, total in zip(optimizers, totals)]
    clipped = [[p for group in opt.param_groups for p in group["params"]] for opt in optimizers]
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and recipe.amp_dtype == "float16")
    epoch_losses: list[list[float]] = [[] for _ in optimizers]
    sums = [0.0] * len(optimizers)  # each set's summed loss and steps in its current epoch
    counts = [0] * len(optimizers)
    # `active` is changed in place (by on_step, after the step's losses are recorded), so it is read, not copied
    training = active if active is not None else [True] * len(optimizers)
    with tqdm(total=longest, desc="train", unit="step", disable=not progress, leave=False) as bar:
        for step in range(longest):
            for i, total in enumerate(totals):
                if step >= total:
                    training[i] = False
                if not training[i] and counts[i]:  # a set stopped mid-epoch: its last epoch's mean is kept
                    epoch_losses[i].append(sums[i] / counts[i])
                    counts[i] = 0
            if not any(training):
                break
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            losses = torch.zeros(len(optimizers), dtype=torch.float32, device=device)
            for group, group_losses in step_losses():
                stacked = torch.stack([loss.float() for loss in group_losses])
                losses[group] = stacked.detach()
                scaler.scale(stacked.sum()).backward()
            values = losses.double().cpu()
            if not torch.isfinite(values).all():
                bad = int((~torch.isfinite(values)).nonzero()[0])
                raise StitchError(
                    f"the loss became {values[bad].item()} at step {step + 1} of {totals[bad]} for "
                    f"{describe(bad)}; lower the learning rate, set Recipe(grad_clip=...), or check the data"
                )
            if before_step is not None:
                before_step()
            step_values = values.tolist()
            for i, (params, opt, scheduler, trains) in enumerate(zip(clipped, optimizers, schedulers, training)):
                if not trains:
                    continue
                if recipe.grad_clip is not None:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                scaler.step(opt)
                scheduler.step()
                sums[i] += step_values[i]
                counts[i] += 1
                if counts[i] == steps_per_epoch or step == totals[i] - 1:
                    epoch_losses[i].append(sums[i] / counts[i])
                    sums[i], counts[i] = 0.0, 0
            scaler.update()
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, longest)
            if len(optimizers) == 1:
                bar.set_postfix(loss=f"{values[0].item():.4f}", refresh=False)
    return epoch_losses


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps for a (possibly fractional) number of epochs; at least one."""
    return max(1, math.ceil(epochs * steps_per_epoch))
