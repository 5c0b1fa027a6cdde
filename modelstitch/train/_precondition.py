"""Preconditioned steps for linear stitches: the gradient whitened by the input's second moments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._errors import StitchError
from ..stitches import Stitch

__all__ = ["DAMPING", "Preconditioner"]

#: Added to the diagonal of the second-moment matrix, relative to its mean diagonal, before inverting it.
DAMPING = 1e-3


class Preconditioner:
    """Multiplies each linear stitch's gradient by the inverse of its input's second moments.

    For a linear core ``y = W x + b`` with input rows ``x`` (pixels, patches
    or tokens), the gradient ``G = [∂W | ∂b]`` ``[out, d]`` becomes
    ``G (M + δ I)⁻¹``, where ``M = E[x̃ x̃ᵀ]`` ``[d, d]`` is the second-moment
    matrix of ``x̃ = [x, 1]`` that the least-squares pass measured
    (`Stitch.input_moments`) and ``δ`` is the stitch's damping (`DAMPING`
    unless given; `Recipe.damping_for`) times its mean diagonal.
    This is gradient descent in whitened input coordinates (the input-side
    factor of K-FAC): a step moves every direction of the input equally,
    however the sender scales and correlates its channels. Stitches of other
    kinds, and linear ones without moments, keep their plain gradient.

    Args:
        stitches: the stitches being trained, in the optimiser's order.
        device: where their gradients live.
        damping: one damping per stitch, relative to the mean diagonal of its
            moments (a larger one moves the step towards the plain gradient,
            scaled); ``None``: `DAMPING` for every stitch.

    Examples:
        >>> from modelstitch.stitches import LeastSquares, make_stitch
        >>> s = make_stitch((2, 4, 4), (2, 4, 4))
        >>> fit = LeastSquares(s)
        >>> fit.update(torch.randn(64, 2, 4, 4) * torch.tensor([1.0, 100.0])[:, None, None], torch.randn(64, 2, 4, 4))
        >>> fit.record_moments()
        >>> s(torch.randn(8, 2, 4, 4)).sum().backward()
        >>> Preconditioner([s], torch.device("cpu"))()
        >>> s.core.weight.grad.shape
        torch.Size([2, 2, 1, 1])
    """

    def __init__(
        self, stitches: Sequence[Stitch], device: torch.device, damping: Sequence[float] | None = None
    ) -> None:
        if damping is not None and len(damping) != len(stitches):
            raise ValueError(f"Preconditioner: {len(damping)} dampings for {len(stitches)} stitches; give one each")
        self.layers: list[tuple[nn.Conv2d | nn.Linear, torch.Tensor]] = []
        for stitch, delta in zip(stitches, damping if damping is not None else [DAMPING] * len(stitches)):
            layer, moments = stitch.linear, stitch.input_moments
            if layer is None or moments is None:
                continue
            rows = layer.weight[0].numel() + int(layer.bias is not None)
            if moments.shape != (rows, rows):
                raise StitchError(
                    f"the stitch {stitch.provided} -> {stitch.expected} has input moments of shape "
                    f"{tuple(moments.shape)}, not ({rows}, {rows}); fit its least squares again"
                )
            m = moments.to(device=device, dtype=torch.float64)
            m = m + delta * m.diagonal().mean().clamp_min(1e-12) * torch.eye(rows, dtype=m.dtype, device=device)
            self.layers.append((layer, torch.linalg.inv(m).to(layer.weight.dtype)))

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def __call__(self) -> None:
        """Precondition the gradients now held by the stitches' linear layers (call between backward and step)."""
        for layer, inverse in self.layers:
            weight, bias = layer.weight, layer.bias
            if weight.grad is None:
                continue
            grads = [weight.grad.reshape(weight.shape[0], -1)]
            if bias is not None:
                grads.append(bias.grad[:, None] if bias.grad is not None else torch.zeros_like(bias)[:, None])
            whitened = torch.cat(grads, dim=1) @ inverse
            weight.grad.copy_(whitened[:, : grads[0].shape[1]].reshape(weight.shape))
            if bias is not None and bias.grad is not None:
                bias.grad.copy_(whitened[:, -1])
