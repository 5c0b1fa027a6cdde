"""`Recipe`: the optimiser, schedule and numerics of one training run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from .._errors import StitchError

__all__ = ["Recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train: initialisation, optimiser, schedule, selection, numerics and seed.

    The optimiser and schedule are the stitch recipe of Hernandez et al.: SGD
    with momentum 0.9, learning rate 0.01 at batch size 256, weight decay
    0.01, 4 epochs, a linear warmup and then cosine decay to zero. Two
    defaults differ from the paper, so that a stitch that exists is found
    (a self-stitch reaches the network's own accuracy at every layer; see
    docs/trust.md for the evidence): a study starts each linear stitch from
    its least-squares fit (``init="lstsq"``), and training keeps the epoch
    whose accuracy on 15% of the training data held out is best
    (``holdout=0.15``). `Recipe.paper` is the paper's recipe exactly.

    Attributes:
        lr: learning rate at batch size ``base_batch_size``; the rate used is
            scaled linearly with ``batch_size`` (see `scaled_lr`).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (SGD's ``weight_decay``).
        batch_size: samples per optimiser step.
        epochs: passes over the training data.
        warmup: fraction of all steps spent in the linear warmup, in [0, 1).
        base_batch_size: the batch size at which ``lr`` is quoted.
        nesterov: Nesterov momentum.
        amp: mixed precision (`torch.autocast` with ``amp_dtype``) for the
            networks' forward passes, in training and evaluation alike:
            ``None`` (default) on CUDA only, ``True`` on any device (on the CPU
            that is bfloat16 autocast, the numerics a GPU run uses), ``False``
            never.
        amp_dtype: ``"bfloat16"`` or ``"float16"`` (float16 gets a gradient
            scaler; on the CPU use bfloat16).
        channels_last: use the channels-last memory format for 4-D tensors.
        grad_clip: clip the gradient norm to this value, or ``None``.
        seed: seeds the stitch's initialisation, the data order and the
            held-out split.
        init: how a `Study` initialises each stitch before training:
            ``"lstsq"`` (the least-squares map from provided to expected
            representation, fitted on the training part; linear stitches
            only, others start at random), ``"random"`` or ``"identity"``.
            `train_stitch` trains the stitch it is given as it is.
        holdout: fraction of the training data held out of training (a seeded
            random split) to choose the epoch to keep: the held-out accuracy
            is measured before training and after each epoch, and the best
            state is restored at the end. ``0`` keeps the last state.
        patience: with held-out selection, stop training a stitch once its
            held-out score has not improved for this many epochs in a row
            (stitches trained together stop one by one; the pass ends when
            none is left). ``None`` (default) trains every stitch for all
            ``epochs``. Time to accuracy on the performance page.
        min_delta: with ``patience``, the rise in held-out accuracy (a
            fraction: ``0.01`` is one point) that counts as an improvement
            for the patience count; a smaller rise still updates the kept
            state. ``0`` (default) counts any better score (accuracy, then
            loss).

    Examples:
        >>> Recipe()
        Recipe(lr=0.01, momentum=0.9, weight_decay=0.01, batch_size=256, epochs=4, warmup=0.1, seed=0)
        >>> Recipe(batch_size=128).scaled_lr
        0.005
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.01
    batch_size: int = 256
    epochs: float = 4
    warmup: float = 0.1
    base_batch_size: int = 256
    nesterov: bool = False
    amp: bool | None = None
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    grad_clip: float | None = None
    init: str = "lstsq"
    holdout: float = 0.15
    patience: int | None = None
    min_delta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.base_batch_size >= 1, "base_batch_size must be >= 1"),
            (self.epochs > 0, "epochs must be > 0"),
            (0 <= self.warmup < 1, "warmup is a fraction of all steps, in [0, 1)"),
            (self.momentum >= 0, "momentum must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.amp in (None, True, False), "amp must be None (CUDA only), True or False"),
            (self.amp_dtype in ("bfloat16", "float16"), "amp_dtype must be 'bfloat16' or 'float16'"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be None or > 0"),
            (self.init in ("lstsq", "random", "identity"), "init must be 'lstsq', 'random' or 'identity'"),
            (0 <= self.holdout < 1, "holdout is a fraction of the training data, in [0, 1)"),
            (self.patience is None or self.patience >= 1, "patience must be None or a number of epochs >= 1"),
            (0 <= self.min_delta < 1, "min_delta is a rise in accuracy, in [0, 1)"),
            (self.min_delta == 0 or self.patience is not None, "min_delta only applies with patience=N"),
        ]
        for ok, message in checks:
            if not ok:
                raise StitchError(f"Recipe: {message} (got {self!r})")

    def __repr__(self) -> str:
        fields = [f for f in dataclasses.fields(self) if f.name not in _REPR_ALWAYS]
        shown = [f"{name}={getattr(self, name)!r}" for name in _REPR_ALWAYS]
        shown[-1:-1] = [f"{f.name}={getattr(self, f.name)!r}" for f in fields if getattr(self, f.name) != f.default]
        return f"Recipe({', '.join(shown)})"

    @classmethod
    def paper(cls, **changes: object) -> Recipe:
        """The stitch recipe of Hernandez et al. exactly: random init, no held-out selection.

        Examples:
            >>> Recipe.paper().init, Recipe.paper().holdout, Recipe.paper(epochs=1).epochs
            ('random', 0.0, 1)
        """
        return cls(**{"init": "random", "holdout": 0.0, **changes})  # type: ignore[arg-type]

    @property
    def scaled_lr(self) -> float:
        """``lr`` scaled linearly from ``base_batch_size`` to ``batch_size``."""
        return self.lr * self.batch_size / self.base_batch_size

    def replace(self, **changes: object) -> Recipe:
        """A copy with some fields changed (validated like the constructor).

        Examples:
            >>> Recipe().replace(epochs=30).epochs
            30
        """
        return dataclasses.replace(self, **changes)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of `scaled_lr` at optimiser step ``step`` (0-based).

        Linear warmup over the first ``warmup * total_steps`` steps, then a
        cosine decay that reaches zero one step after the last.

        Examples:
            >>> r = Recipe(warmup=0.25)
            >>> [round(r.lr_factor(s, 8), 3) for s in range(8)]
            [0.5, 1.0, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067]
        """
        warmup_steps = math.floor(self.warmup * total_steps)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = (step - warmup_steps) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.SGD:
        """SGD over ``params`` at `scaled_lr` with this recipe's momentum and decay."""
        return torch.optim.SGD(
            params,
            lr=self.scaled_lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )

    def uses_amp(self, device: torch.device) -> bool:
        """Whether forward passes on ``device`` run under autocast (see ``amp``).

        Examples:
            >>> Recipe().uses_amp(torch.device("cpu")), Recipe(amp=True).uses_amp(torch.device("cpu"))
            (False, True)
        """
        return self.amp if self.amp is not None else device.type == "cuda"

    def autocast(self, device: torch.device) -> torch.autocast:
        """The `torch.autocast` context of this recipe's numerics on ``device`` (disabled when not `uses_amp`)."""
        return torch.autocast(
            device_type=device.type, dtype=getattr(torch, self.amp_dtype), enabled=self.uses_amp(device)
        )

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup-then-cosine schedule over ``total_steps`` optimiser steps."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total_steps))


_REPR_ALWAYS = ("lr", "momentum", "weight_decay", "batch_size", "epochs", "warmup", "seed")
