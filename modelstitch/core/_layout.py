"""`ForwardLayout`: forward-only passes on the CPU with 4-D inputs in the channels-last memory format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .._errors import StitchError
from ._batches import to_device

__all__ = ["ForwardLayout"]

T = TypeVar("T")


class ForwardLayout:
    """Runs forward-only passes with their 4-D inputs channels-last on the CPU, contiguous once that fails.

    On the CPU, oneDNN convolves channels-last maps without reordering them
    to and from its blocked layout at every layer: with the weights left as
    they are, evaluating the 30 cells of cifar-small's R1211 -> R1111 on
    2,000 test images took 5.58 s against 8.08 s contiguous, the quick
    preset's on 360 images 0.43 s against 0.63 s (`benchmarks/bench_eval.py`,
    2-core Intel Xeon, torch 2.14.1; the same accuracy in every cell, losses
    within 2e-7; docs/performance.md). Only passes without a backward use it: oneDNN's
    channels-last 1x1 convolution backward crashed on an AMD EPYC (see
    `Recipe.uses_channels_last`). The numbers are the same either way; a
    network that cannot take a channels-last input (one that calls
    ``.view`` on a map) fails once, and every pass after that, the one that
    failed included, runs on the input as it came. Elsewhere than on the
    CPU (or with no ``device``) inputs go as they come.

    Examples:
        >>> layout = ForwardLayout(torch.device("cpu"))
        >>> layout(lambda x: x.is_contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 4, 4))
        True
        >>> layout(lambda x: x.view(2, -1).shape, torch.randn(2, 3, 4, 4)), layout.channels_last
        (torch.Size([2, 48]), False)
    """

    def __init__(self, device: torch.device | None) -> None:
        self.channels_last = device is not None and device.type == "cpu"

    def __call__(self, forward: Callable[[Any], T], x: Any) -> T:
        """``forward(x)``, with ``x``'s 4-D tensors channels-last while that works."""
        if self.channels_last:
            try:
                return forward(to_device(x, torch.device("cpu"), channels_last=True))
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, StitchError):  # e.g. a .view of a map; a real error comes back below
                self.channels_last = False
        return forward(x)
