"""`Positions` and `position_mask`: which token positions count in a representation's statistics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from .._errors import StitchError

__all__ = ["Positions", "position_mask"]


@dataclasses.dataclass(frozen=True)
class Positions:
    """Which positions of token representations ``[B, T, D]`` enter least squares, the MSE loss and the FVU.

    Padding (``attention_mask == 0`` in the batch) never counts. Beyond it:

    Attributes:
        skip_first: leave out the first this many positions of every
            sequence (the first token of a language model, whose norm is
            often far above the others': an "attention sink").
        max_norm_ratio: leave out positions whose representation's norm is
            more than this many times the median norm of the batch's kept
            positions (``None``: keep all).

    Examples:
        >>> Positions(skip_first=1)
        Positions(skip_first=1, max_norm_ratio=None)
    """

    skip_first: int = 0
    max_norm_ratio: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.skip_first, bool) or not isinstance(self.skip_first, int) or self.skip_first < 0:
            raise StitchError(f"Positions: skip_first must be an int >= 0, got {self.skip_first!r}")
        ratio = self.max_norm_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1
        ):
            raise StitchError(f"Positions: max_norm_ratio must be None or a finite number > 1, got {ratio!r}")

    @property
    def filters(self) -> bool:
        """Whether anything beyond padding is left out."""
        return self.skip_first > 0 or self.max_norm_ratio is not None


def position_mask(
    inputs: Any, representations: Sequence[torch.Tensor], positions: Positions | None = None
) -> torch.Tensor | None:
    """The positions ``[B, T]`` (bool) that count, for token representations of one batch.

    Args:
        inputs: the batch's model inputs; a dict's ``attention_mask [B, T]``
            marks padding.
        representations: tensors of the batch; the first, ``[B, T, D]``, sets
            the positions (e.g. the expected representation), and a position is
            left out when it is an outlier under ``positions.max_norm_ratio``
            in any of them of that ``[B, T]`` (e.g. the provided one too).
        positions: what else to leave out (``None``: padding only).

    Returns:
        A bool mask ``[B, T]``, or ``None`` when every position counts (no
        padding, no filter) or the first representation is not a token
        sequence.

    Raises:
        StitchError: an attention mask whose shape is not the representations' ``[B, T]``, or a mask that
            leaves no position.

    Examples:
        >>> reps = [torch.ones(2, 4, 3)]
        >>> position_mask({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}, reps, Positions(1))
        tensor([[False,  True,  True, False],
                [False,  True,  True,  True]])
    """
    positions = positions or Positions()
    if not representations or representations[0].dim() != 3:
        return None
    shape = representations[0].shape[:2]
    representations = [r for r in representations if r.dim() == 3 and r.shape[:2] == shape]
    attention = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if attention is None and not positions.filters:
        return None
    if attention is not None and tuple(attention.shape) != tuple(shape):
        raise StitchError(
            f"the attention_mask has shape {tuple(attention.shape)}, but the representations are [B, T] = "
            f"{tuple(shape)}; give a mask of one entry per token"
        )
    keep = torch.ones(shape, dtype=torch.bool, device=representations[0].device)
    if attention is not None:
        keep &= attention.to(keep.device) != 0
    if positions.skip_first:
        keep[:, : positions.skip_first] = False
    if positions.max_norm_ratio is not None and keep.any():
        for r in representations:
            norms = r.detach().float().norm(dim=-1)
            keep &= norms <= positions.max_norm_ratio * norms[keep].median()
    if not keep.any():
        raise StitchError(
            f"no position of this batch counts (padding, skip_first={positions.skip_first}, "
            f"max_norm_ratio={positions.max_norm_ratio}); use shorter skips or longer sequences"
        )
    return keep
