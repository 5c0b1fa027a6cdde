"""`Recipe`: the optimiser, schedule and numerics of one training run."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from .._errors import StitchError
from ..core import Positions
from ._precondition import DAMPING

__all__ = ["UPSAMPLED", "Recipe"]

UPSAMPLED = 4
"""A stitch that upsamples by this factor or more per side trains `Recipe.upsampled_epochs_factor` times longer,
at `Recipe.upsampled_lr_factor` times the learning rate, with whitened steps damped by `Recipe.upsampled_damping`."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train: initialisation, optimiser, schedule, selection, numerics and seed.

    The defaults reach the stitch recipe of Hernandez et al. (`Recipe.paper`)
    cell by cell, over four seeds against its two, in 0.32 to 0.33 of its
    time (docs/performance.md, "A third of the paper's time"): each linear
    stitch starts from its least-squares fit (``init="lstsq"``) and its
    gradient is whitened by its input's second moments
    (``precondition=True``); then three quarters of an epoch of SGD with
    momentum 0.5 at learning rate 0.125 (batch 32), weight decay 0.01, 30%
    linear warmup and cosine decay to zero; a stitch that upsamples its input
    by 4 or more per side (a deep sender into an early receiver layer) trains
    twice as long at 0.6 times the rate, its whitened
    steps damped by 0.3 of its moments' mean diagonal instead of 0.001
    (``upsampled_epochs_factor``, ``upsampled_lr_factor``,
    ``upsampled_damping``); and
    training keeps the state of lowest loss on 5% of the training data
    held out (``holdout=0.05``, at least `train.MIN_HOLDOUT` samples). A
    self-stitch reaches the network's own accuracy at every layer
    (docs/trust.md). `Recipe.paper` is the paper's recipe exactly: SGD with
    momentum 0.9 at 0.01 (batch 256), weight decay 0.01, 4 epochs, 10%
    warmup, from a random start, the last state kept.

    Every field is checked when a recipe is made: a value of the wrong type
    (``epochs="4"``, ``batch_size=2.5``, a bool where a number goes), a number
    that is not finite, or one out of range raises a `StitchError` naming the
    field, the value and what is allowed. Ints are fine for the float fields;
    numpy numbers are turned into Python ones.

    Attributes:
        lr: learning rate at batch size ``base_batch_size``; the rate used is
            scaled linearly with ``batch_size`` (see `scaled_lr`). The
            default, 0.125 at batch 32, is for whitened steps from a
            least-squares start; plain steps from a random start (``init=
            "random"``, stitch kinds other than ``linear``) need a far lower
            one, such as `Recipe.paper`'s 0.01 at batch 256 (at the default's
            rate a random-start digits cell's training loss averaged 50 over
            its epoch, and its start was kept).
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 weight decay (SGD's ``weight_decay``).
        batch_size: samples per optimiser step. The default, 32, takes twice
            the steps of version 0.3's 64 at the same rate per sample: at 64,
            digits cells into a receiver's ``stem`` or ``layer1.0`` blew up in
            their first epoch and ended up to 11 points below version 0.2's
            default; at 32, 3.1 points at most (docs/performance.md, "Batch
            32"), for 9% to 20% more time.
        epochs: passes over the training data. The default, three quarters
            of an epoch (1 until version 0.5), matched the paper's recipe cell
            by cell over four seeds, in 0.32 to 0.33 of its time on a 2-core
            CPU (docs/performance.md, "A third of the paper's time").
        upsampled_epochs_factor: a stitch whose nearest upsampling is by
            `UPSAMPLED` (4) or more per side (`Stitch.upsample`: a deep
            sender into an early receiver layer, whose least-squares start is
            far from trained) trains for this many times ``epochs``, on its
            own schedule; ``1`` trains every stitch alike. Measured: after one
            epoch such cells of CIFAR-10 ResNets were up to 3 points below the
            paper's recipe, after two within a point.
        upsampled_lr_factor: the same stitches train at this many times the
            learning rate (`lr_for`); ``1`` trains every stitch at ``lr``.
            Measured (docs/performance.md, "Batch 32"): at batch 64 and the
            full rate, a deep digits cell (R1111 ``layer3.0`` -> R1211
            ``stem``, the main job's networks) ended at 0.731, at 0.4 times
            the rate 0.922 (version 0.2's default: 0.906). At batch 32 it
            matters less: over the 11 cells that upsample in the two digits
            benchmark pairs, 0.4 against 1 moved a cell by -3.1 to +3.3
            points, none on average (``layer3.0`` -> ``stem`` +1.7 and +3.3).
            With three quarters of an epoch (the default since version 0.5,
            when this factor went from 0.4 to 0.6) the digits cell R1211
            ``layer4.0`` -> R1111 ``layer2.0`` stayed within a point of the
            paper's recipe over four seeds at 0.6, not at 0.4
            (docs/performance.md, "A third of the paper's time").
        upsampled_damping: with ``precondition``, the same stitches' whitened
            steps add this many times the mean diagonal of their input's
            second moments to it before inverting it (`damping_for`; other
            stitches add `train.DAMPING`, 0.001): a step between the
            whitened and the plain one. Measured (docs/trust.md, "Damping
            the cells that upsample"): over 4 seeds, CIFAR-10 R1211
            ``layer4.0`` -> R1111 ``stem`` reached 0.477 at 0.001 and 0.494
            at 0.3 (the paper's recipe 0.4915 at both its seeds); damping
            every stitch so cost digits 1.2 points on average, damping only
            these did not.
        warmup: fraction of all steps spent in the linear warmup, in [0, 1).
        base_batch_size: the batch size at which ``lr`` is quoted.
        nesterov: Nesterov momentum (SGD only).
        optim: ``"sgd"`` (default: SGD with ``momentum``, the paper's) or
            ``"adamw"`` (AdamW with betas ``(momentum, 0.999)`` and decoupled
            ``weight_decay``: how the zoo's language models are trained).
        amp: mixed precision (`torch.autocast` with ``amp_dtype``) for the
            networks' forward passes, in training and evaluation alike:
            ``None`` (default) on CUDA only, ``True`` on any device (on the CPU
            that is bfloat16 autocast, the numerics a GPU run uses), ``False``
            never. The stitch itself computes in float32 either way
            (`Stitch.forward`).
        amp_dtype: ``"bfloat16"`` or ``"float16"`` (float16 gets a gradient
            scaler; on the CPU use bfloat16).
        channels_last: use the channels-last memory format for 4-D tensors,
            on CUDA only (see `uses_channels_last`).
        grad_clip: clip the gradient norm to this value, or ``None``.
        positions: which positions of token representations ``[B, T, D]``
            enter least squares and the MSE loss besides the unpadded ones
            (`modelstitch.core.Positions`: skip the first k, or norm
            outliers); ``None`` (default): every unpadded position. Padding
            never counts.
        seed: seeds the stitch's initialisation, the data order and the
            held-out split.
        init: how a stitch starts before training: ``"lstsq"`` (the
            least-squares map from provided to expected representation,
            fitted on the training part; linear stitches only, others start
            at random with a warning), ``"random"`` or ``"identity"``. A
            `Study` starts every cell so; `train_stitch` starts a stitch made
            with ``stitch(..., init="auto")`` (the default) so, and trains a
            stitch whose start was fixed at `stitch` from that start.
        precondition: multiply the gradient of each linear stitch that started
            from least squares by the inverse of its input's second-moment
            matrix before every step (`modelstitch.train.Preconditioner`; the
            least-squares pass measured the matrix, so it costs no pass of its
            own), so that a step is the same size in every input direction
            however the sender scales its channels. Cells whose least-squares
            start is poor (a deep sender into an early receiver layer) leave
            it in under an epoch instead of four (docs/trust.md). Stitches
            started at random or at the identity, and other kinds, take plain
            steps: from a random start, whitened steps were measured to hurt.
        holdout: fraction of the training data held out of training (a seeded
            random split; at least `train.MIN_HOLDOUT` samples, or a quarter
            of the data where that is fewer) to choose the state to keep: the held-out accuracy
            is measured before training, after each epoch and at the end of
            the schedule (and half-way through a schedule of one epoch or
            less), and the best state is restored at the end. ``0`` keeps the
            last state.
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
        Recipe(lr=0.125, momentum=0.5, weight_decay=0.01, batch_size=32, epochs=0.75, warmup=0.3, seed=0)
        >>> Recipe(batch_size=128).scaled_lr
        0.5
    """

    lr: float = 0.125
    momentum: float = 0.5
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: float = 0.75
    warmup: float = 0.3
    base_batch_size: int = 32
    upsampled_epochs_factor: float = 2.0
    upsampled_lr_factor: float = 0.6
    upsampled_damping: float = 0.3
    nesterov: bool = False
    optim: str = "sgd"
    amp: bool | None = None
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    grad_clip: float | None = None
    init: str = "lstsq"
    precondition: bool = True
    holdout: float = 0.05
    patience: int | None = None
    min_delta: float = 0.0
    positions: Positions | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (parse, ok, rule) in _RULES.items():
            value = getattr(self, name)
            parsed = parse(value)
            if parsed is _INVALID or not ok(parsed):
                raise StitchError(f"Recipe: {name} {rule}, got {value!r}")
            # numpy scalars become Python numbers: the repr (a study's fingerprint) and JSON stay plain
            object.__setattr__(self, name, parsed)
        if self.min_delta != 0 and self.patience is None:
            raise StitchError(
                f"Recipe: min_delta only applies with patience=N, got min_delta={self.min_delta!r} and patience=None"
            )
        if self.nesterov and self.optim != "sgd":
            raise StitchError(f"Recipe: nesterov=True is SGD's; optim={self.optim!r} has no Nesterov momentum")
        if self.nesterov and self.momentum == 0:
            raise StitchError("Recipe: nesterov=True needs momentum > 0, got momentum=0")

    def __repr__(self) -> str:
        fields = [f for f in dataclasses.fields(self) if f.name not in _REPR_ALWAYS]
        shown = [f"{name}={getattr(self, name)!r}" for name in _REPR_ALWAYS]
        shown[-1:-1] = [f"{f.name}={getattr(self, f.name)!r}" for f in fields if getattr(self, f.name) != f.default]
        return f"Recipe({', '.join(shown)})"

    @classmethod
    def paper(cls, **changes: object) -> Recipe:
        """The stitch recipe of Hernandez et al. exactly: random init, plain SGD steps, no held-out selection.

        SGD with momentum 0.9 at learning rate 0.01 for batch size 256, weight
        decay 0.01, 4 epochs, 10% linear warmup then cosine decay, every stitch
        alike, the last state kept; ``changes`` replace any of these.

        Examples:
            >>> r = Recipe.paper()
            >>> r.lr, r.momentum, r.weight_decay, r.batch_size, r.epochs, r.warmup
            (0.01, 0.9, 0.01, 256, 4, 0.1)
            >>> r.upsampled_epochs_factor, r.upsampled_lr_factor, r.upsampled_damping
            (1.0, 1.0, 0.001)
            >>> r.init, r.precondition, r.holdout, Recipe.paper(epochs=1).epochs
            ('random', False, 0.0, 1)
        """
        return cls(**{**_PAPER, **changes})  # type: ignore[arg-type]

    @property
    def scaled_lr(self) -> float:
        """``lr`` scaled linearly from ``base_batch_size`` to ``batch_size``."""
        return self.lr * self.batch_size / self.base_batch_size

    def epochs_for(self, stitch: torch.nn.Module) -> float:
        """The epochs ``stitch`` trains for: ``epochs``, times ``upsampled_epochs_factor`` for a stitch that
        upsamples by `UPSAMPLED` or more per side.

        Examples:
            >>> from modelstitch.stitches import make_stitch
            >>> by_4, by_2 = make_stitch((8, 4, 4), (4, 16, 16)), make_stitch((8, 4, 4), (4, 8, 8))
            >>> Recipe().epochs_for(by_4), Recipe().epochs_for(by_2), Recipe.paper().epochs_for(by_4)
            (1.5, 0.75, 4.0)
        """
        return self.epochs * self.upsampled_epochs_factor if _upsampled(stitch) else self.epochs

    def lr_for(self, stitch: torch.nn.Module) -> float:
        """The learning rate ``stitch`` trains at: `scaled_lr`, times ``upsampled_lr_factor`` for a stitch that
        upsamples by `UPSAMPLED` or more per side.

        Examples:
            >>> from modelstitch.stitches import make_stitch
            >>> by_4, by_2 = make_stitch((8, 4, 4), (4, 16, 16)), make_stitch((8, 4, 4), (4, 8, 8))
            >>> Recipe().lr_for(by_4), Recipe().lr_for(by_2), Recipe.paper().lr_for(by_4)
            (0.075, 0.125, 0.01)
        """
        return self.scaled_lr * self.upsampled_lr_factor if _upsampled(stitch) else self.scaled_lr

    def damping_for(self, stitch: torch.nn.Module) -> float:
        """The damping of ``stitch``'s whitened steps (`train.Preconditioner`): ``upsampled_damping`` for a stitch
        that upsamples by `UPSAMPLED` or more per side, else `train.DAMPING`.

        Examples:
            >>> from modelstitch.stitches import make_stitch
            >>> by_4, by_2 = make_stitch((8, 4, 4), (4, 16, 16)), make_stitch((8, 4, 4), (4, 8, 8))
            >>> Recipe().damping_for(by_4), Recipe().damping_for(by_2)
            (0.3, 0.001)
        """
        return self.upsampled_damping if _upsampled(stitch) else DAMPING

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

    def optimizer(self, params: Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """SGD (or AdamW, see ``optim``) over ``params`` at ``lr`` (default `scaled_lr`) with this recipe's
        momentum and decay."""
        lr = self.scaled_lr if lr is None else lr
        if self.optim == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=(self.momentum, 0.999), weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params,
            lr=lr,
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

    def uses_channels_last(self, device: torch.device) -> bool:
        """Whether networks and 4-D batches on ``device`` use the channels-last memory format.

        Only on CUDA: on the CPU, oneDNN's channels-last convolution backward
        crashed the process (a segmentation fault) with one intra-op thread
        on an AMD EPYC with torch 2.14.1, and the format is a GPU speed-up.

        Examples:
            >>> Recipe(channels_last=True).uses_channels_last(torch.device("cpu"))
            False
        """
        return self.channels_last and device.type == "cuda"

    def autocast(self, device: torch.device) -> torch.autocast:
        """The `torch.autocast` context of this recipe's numerics on ``device`` (disabled when not `uses_amp`)."""
        return torch.autocast(
            device_type=device.type, dtype=getattr(torch, self.amp_dtype), enabled=self.uses_amp(device)
        )

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup-then-cosine schedule over ``total_steps`` optimiser steps."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total_steps))


_PAPER: dict[str, object] = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.01,
    "batch_size": 256,
    "base_batch_size": 256,
    "epochs": 4,
    "warmup": 0.1,
    "upsampled_epochs_factor": 1.0,
    "upsampled_lr_factor": 1.0,
    "upsampled_damping": DAMPING,
    "init": "random",
    "precondition": False,
    "holdout": 0.0,
}
"""`Recipe.paper`: every field of the paper's recipe that differs from the defaults, or might one day."""


def _upsampled(stitch: torch.nn.Module) -> bool:
    """Whether ``stitch`` upsamples by `UPSAMPLED` or more per side (`Stitch.upsample`; 1 for other modules)."""
    return getattr(stitch, "upsample", 1) >= UPSAMPLED


_REPR_ALWAYS = ("lr", "momentum", "weight_decay", "batch_size", "epochs", "warmup", "seed")


_INVALID = object()  # what a parser returns for a value of the wrong kind (a string, a bool, NaN for a number)


def _number(value: object) -> object:
    """``value`` as a Python ``int`` or ``float`` if it is a finite real number (bools are not), else `_INVALID`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _INVALID
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return _INVALID
    if not math.isfinite(number):
        return _INVALID
    return int(value) if isinstance(value, numbers.Integral) else number


def _whole(value: object) -> object:
    """``value`` as a Python ``int`` if it is an integer (numpy too; bools and ``2.0`` are not), else `_INVALID`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return _INVALID
    return int(value)


def _flag(value: object) -> object:
    """``value`` as a Python ``bool`` if it is one (a numpy one too; ``1`` is not), else `_INVALID`."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else _INVALID


def _optional(parse: Callable[[object], object]) -> Callable[[object], object]:
    """A parser that also lets ``None`` through."""
    return lambda value: None if value is None else parse(value)


def _choice(*allowed: str) -> Callable[[object], object]:
    """A parser that accepts exactly the strings ``allowed``."""
    return lambda value: value if isinstance(value, str) and value in allowed else _INVALID


# field -> (parser, range check on the parsed value, what is allowed as the error message words it)
_RULES: dict[str, tuple[Callable[[object], object], Callable[[Any], bool], str]] = {
    "lr": (_number, lambda v: v > 0, "must be a finite number > 0"),
    "momentum": (_number, lambda v: 0 <= v < 1, "must be a finite number in [0, 1)"),
    "weight_decay": (_number, lambda v: v >= 0, "must be a finite number >= 0"),
    "batch_size": (_whole, lambda v: v >= 1, "must be a whole number >= 1"),
    "epochs": (_number, lambda v: v > 0, "must be a finite number > 0"),
    "warmup": (_number, lambda v: 0 <= v < 1, "is a fraction of all steps, a number in [0, 1)"),
    "base_batch_size": (_whole, lambda v: v >= 1, "must be a whole number >= 1"),
    "upsampled_epochs_factor": (_number, lambda v: v >= 1, "must be a finite number >= 1"),
    "upsampled_lr_factor": (_number, lambda v: v > 0, "must be a finite number > 0"),
    "upsampled_damping": (_number, lambda v: v >= 0, "must be a finite number >= 0"),
    "nesterov": (_flag, lambda v: True, "must be True or False"),
    "optim": (_choice("sgd", "adamw"), lambda v: True, "must be 'sgd' or 'adamw'"),
    "amp": (_optional(_flag), lambda v: True, "must be None (CUDA only), True or False"),
    "amp_dtype": (_choice("bfloat16", "float16"), lambda v: True, "must be 'bfloat16' or 'float16'"),
    "channels_last": (_flag, lambda v: True, "must be True or False"),
    "grad_clip": (_optional(_number), lambda v: v is None or v > 0, "must be None or a finite number > 0"),
    "init": (_choice("lstsq", "random", "identity"), lambda v: True, "must be 'lstsq', 'random' or 'identity'"),
    "precondition": (_flag, lambda v: True, "must be True or False"),
    "holdout": (_number, lambda v: 0 <= v < 1, "is a fraction of the training data, a number in [0, 1)"),
    "patience": (_optional(_whole), lambda v: v is None or v >= 1, "must be None or a whole number of epochs >= 1"),
    "min_delta": (_number, lambda v: 0 <= v < 1, "is a rise in accuracy, a number in [0, 1)"),
    "positions": (
        lambda v: v if v is None or isinstance(v, Positions) else _INVALID,
        lambda v: True,
        "must be None or a modelstitch.core.Positions(skip_first=..., max_norm_ratio=...)",
    ),
    "seed": (_whole, lambda v: 0 <= v < 2**64, "must be a whole number in [0, 2**64)"),
}
