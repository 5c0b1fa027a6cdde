"""Turning what callers pass (tensors, arrays, feature maps) into checked float64 matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._errors import StitchError

__all__ = ["FLATTEN_RULES", "as_matrix", "as_pair", "centered", "flatten_features"]

FLATTEN_RULES: tuple[str, ...] = ("flatten", "mean", "cls", "last")
"""The rules `flatten_features` accepts."""

# A matrix counts as constant when centring leaves nothing above this fraction of its largest entry:
# the rounding of a column mean is a few float64 epsilons, far below any real spread of values.
_CONSTANT_RTOL = 1e-13


def flatten_features(t: Any, rule: str = "flatten") -> Any:
    """Turn one layer's output into a ``[N, features]`` matrix by a named rule.

    How each input shape is read (the first axis is always the ``N`` samples):

    - ``[N]``: one feature per sample, returned as ``[N, 1]`` whatever the rule.
    - ``[N, D]``: already a matrix, returned unchanged whatever the rule.
    - ``[N, T, D]``: transformer *tokens* (T tokens of width D, as timm and Hugging Face lay them out).
      ``"flatten"`` gives ``[N, T*D]``, ``"mean"`` the token mean ``[N, D]``, ``"cls"`` the first
      token ``[N, D]`` (a ViT's class token), ``"last"`` the last token ``[N, D]`` (a causal
      language model's summary). A channel-first 1-D map ``[N, C, L]`` must be transposed to
      ``[N, L, C]`` first for ``"mean"`` to average over positions.
    - ``[N, C, H, W]`` (or more spatial axes): channel-first *feature maps*. ``"flatten"`` gives
      ``[N, C*H*W]``, ``"mean"`` the spatial (global-average-pool) mean ``[N, C]``; ``"cls"`` and
      ``"last"`` are refused.

    ``"flatten"`` keeps every unit (what Kornblith et al. 2019 compare); ``"mean"`` discards where in the
    image or sequence a feature fired, so it compares channels, and costs far less memory and time.

    Args:
        t: a torch tensor or numpy array ``[N, ...]``.
        rule: one of ``"flatten"``, ``"mean"``, ``"cls"``, ``"last"`` (see `FLATTEN_RULES`).

    Returns:
        ``[N, features]``, of the same kind as ``t`` (tensor in, tensor out on the same device and with
        the same dtype; array in, array out).

    Raises:
        StitchError: an unknown rule, a scalar, or a token rule on a feature map.

    Examples:
        >>> import torch
        >>> maps = torch.ones(8, 16, 4, 4)
        >>> flatten_features(maps).shape, flatten_features(maps, "mean").shape
        (torch.Size([8, 256]), torch.Size([8, 16]))
        >>> tokens = torch.arange(24.0).reshape(2, 3, 4)
        >>> flatten_features(tokens, "cls").tolist()
        [[0.0, 1.0, 2.0, 3.0], [12.0, 13.0, 14.0, 15.0]]
    """
    if rule not in FLATTEN_RULES:
        raise StitchError(f"flatten_features: unknown rule {rule!r}; choose one of {list(FLATTEN_RULES)}")
    was_numpy = not isinstance(t, torch.Tensor)
    if was_numpy:
        array = np.asarray(t)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise StitchError(f"flatten_features: expected a tensor or a numeric array, got dtype {array.dtype}")
        x = torch.from_numpy(array)
    else:
        x = t
    if x.ndim == 0:
        raise StitchError("flatten_features: got a scalar; expected a tensor [N, ...] with one row per sample")
    if x.ndim == 1:
        out = x[:, None]
    elif x.ndim == 2:
        out = x
    elif rule == "flatten":
        out = x.reshape(x.shape[0], -1)
    elif rule == "mean":
        out = x.mean(dim=1) if x.ndim == 3 else x.mean(dim=tuple(range(2, x.ndim)))
    elif x.ndim == 3:
        out = x[:, 0] if rule == "cls" else x[:, -1]
    else:
        raise StitchError(
            f"flatten_features: rule {rule!r} picks a token of a [N, T, D] tensor, but got a feature map of "
            f"shape {tuple(x.shape)}; use rule='flatten' or rule='mean' for maps"
        )
    return out.numpy() if was_numpy else out


def as_matrix(value: Any, name: str, measure: str, *, device: torch.device | None = None) -> torch.Tensor:
    """``value`` as a float64 ``[N, p]`` tensor (a ``[N]`` vector becomes ``[N, 1]``), checked."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if device is not None and t.device != device:
            raise StitchError(f"{measure}: {name} is on {t.device} but the other input is on {device}; move one")
    else:
        try:
            array = np.asarray(value)
        except Exception as err:  # ragged lists and the like
            raise StitchError(f"{measure}: {name} cannot be read as an array ({err})") from err
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise StitchError(f"{measure}: {name} must hold numbers, got an array of dtype {array.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(array))
        if device is not None:
            t = t.to(device)
    if t.is_complex():
        raise StitchError(f"{measure}: {name} is complex ({t.dtype}); the measures take real features")
    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise StitchError(
            f"{measure}: {name} has shape {tuple(t.shape)}; the measures take a [N, features] matrix. "
            "Turn feature maps [N, C, H, W] or tokens [N, T, D] into one with "
            "modelstitch.metrics.flatten_features(t, rule='flatten' | 'mean' | 'cls')"
        )
    if t.shape[1] == 0:
        raise StitchError(f"{measure}: {name} has no features (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise StitchError(f"{measure}: {name} contains NaN or infinite values")
    return t


def as_pair(x: Any, y: Any, measure: str, *, min_samples: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float64 matrices on one device, with the same number of samples (at least ``min_samples``).

    A numpy input follows a tensor input onto its device; two tensors on different devices are refused.
    """
    if not isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        ym = as_matrix(y, "Y", measure)
        xm = as_matrix(x, "X", measure, device=ym.device)
    else:
        xm = as_matrix(x, "X", measure)
        ym = as_matrix(y, "Y", measure, device=xm.device)
    if xm.shape[0] != ym.shape[0]:
        raise StitchError(
            f"{measure}: X has {xm.shape[0]} samples (rows) but Y has {ym.shape[0]}; "
            "both must be representations of the same inputs, in the same order"
        )
    if xm.shape[0] < min_samples:
        raise StitchError(f"{measure} needs at least {min_samples} samples, got {xm.shape[0]}")
    return xm, ym


def centered(x: torch.Tensor, name: str, measure: str) -> torch.Tensor:
    """``x`` minus its column means; refuses a matrix whose rows are all equal (nothing varies across samples)."""
    xc = x - x.mean(dim=0, keepdim=True)
    scale = float(x.abs().max())
    if float(xc.abs().max()) <= _CONSTANT_RTOL * scale:
        what = "all zeros" if scale == 0 else "constant across samples (every row is the same)"
        raise StitchError(f"{measure} is undefined when an input does not vary: {name} is {what}")
    return xc
