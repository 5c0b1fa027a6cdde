"""Device selection shared by every entry point that takes ``device=``."""

from __future__ import annotations

import torch

from .._errors import StitchError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a caller's ``device`` option into a `torch.device`.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``None`` (same as
            ``"auto"``), or anything `torch.device` accepts.

    Returns:
        The device to use.

    Raises:
        StitchError: CUDA was asked for but is not available, or a CUDA device
            index past the last visible device.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise StitchError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StitchError(
            f"device={device!r} asked for CUDA, but torch.cuda.is_available() is False; use device='cpu' or 'auto'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StitchError(
            f"device={device!r} asks for CUDA device {dev.index}, but torch sees {torch.cuda.device_count()} "
            "(numbered from 0; CUDA_VISIBLE_DEVICES sets which); use 'cuda' for the first one or 'auto'"
        )
    return dev
