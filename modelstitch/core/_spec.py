"""`ActivationSpec`: what one probe pass learns about a layer's output."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

__all__ = ["ActivationSpec", "Layout", "layout_of"]

Layout = Literal["vector", "tokens", "map"]

_LAYOUTS: dict[int, Layout] = {1: "vector", 2: "tokens", 3: "map"}


def layout_of(shape: tuple[int, ...]) -> Layout | None:
    """Name the layout of a per-sample shape, or ``None`` if it has none.

    Args:
        shape: a shape *without* the batch dimension.

    Returns:
        ``"vector"`` for ``[D]``, ``"tokens"`` for ``[N, D]``, ``"map"`` for
        ``[C, H, W]``; ``None`` for any other rank.

    Examples:
        >>> layout_of((64, 8, 8)), layout_of((197, 192)), layout_of((10,))
        ('map', 'tokens', 'vector')
    """
    return _LAYOUTS.get(len(shape))


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """Name, per-sample shape and dtype of one layer's output.

    Attributes:
        name: the layer's address, as accepted by `capture` and `stitch`
            (``"layer3.1"``, ``"input"``, or ``"relu:1"`` for the second call of
            a module that runs more than once per forward).
        shape: the output's shape *without* the batch dimension, e.g.
            ``(256, 8, 8)`` for a ``[B, 256, 8, 8]`` feature map.
        dtype: the output's dtype.
        calls: how many times the module ran in the probe forward (1 for
            most layers).

    >>> ActivationSpec("layer1", (64, 32, 32), torch.float32).layout
    'map'
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    calls: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def layout(self) -> Layout | None:
        """``"vector"``, ``"tokens"``, ``"map"`` or ``None`` (see `layout_of`)."""
        return layout_of(self.shape)

    @property
    def numel(self) -> int:
        """Number of elements per sample."""
        n = 1
        for s in self.shape:
            n *= s
        return n
