"""`frozen`: eval mode and no ``requires_grad`` inside a block, restored exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["frozen"]


@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode with ``requires_grad=False`` inside the block.

    Every module's ``training`` flag and every parameter's ``requires_grad``
    flag is put back exactly as it was on exit, also on exceptions. Autograd
    records ``requires_grad`` when the forward runs, so a backward after the
    block still computes no gradient for these parameters.
    """
    modules: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}
    for model in models:
        for m in model.modules():
            modules.setdefault(id(m), m)
        for p in model.parameters():
            params.setdefault(id(p), p)
    modes = [(m, m.training) for m in modules.values()]
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for m, _ in modes:
            m.training = False
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
