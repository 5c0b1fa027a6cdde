"""Least-squares initialisation of many stitches in one pass over the data."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import BatchFn, as_loader, iterate_batches, resolve_device
from ..stitches import LeastSquares, StitchedModel
from ._plan import Plan, cross_entropy

__all__ = ["fit_least_squares_all"]


@torch.no_grad()
def fit_least_squares_all(
    models: Sequence[StitchedModel],
    data: Any,
    *,
    ridge: float = 1e-4,
    batch_fn: BatchFn | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> int:
    """Set every linear stitch to its least-squares map, streaming ``data`` once for all of them.

    `stitches.fit_least_squares` for many cells at once: each batch runs
    every sender and receiver once for all the layers the cells need (as
    training does), and each stitch accumulates its own normal equations in
    float64 (`LeastSquares`). Stitches of other kinds are left as they are.

    Args:
        models: stitched models, e.g. every cell of a pair.
        data: Dataset, DataLoader or iterable of batches (labels are ignored).
        ridge: relative ridge penalty (see `LeastSquares.solve`).
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        batch_size: batch size when ``data`` is a Dataset.
        device: where to run.
        progress: show a progress bar.

    Returns:
        The number of regression rows of the first fitted stitch (0 if none is linear).
    """
    linear = [m for m in models if m.stitch.linear is not None]
    if not linear:
        return 0
    dev = resolve_device(device)
    for m in linear:
        m.to(dev)
    plan = Plan(linear, "mse", cross_entropy)
    fits = [LeastSquares(m.stitch) for m in linear]
    loader = as_loader(data, batch_size=batch_size, shuffle=False, what="least-squares data")
    with contextlib.ExitStack() as stack:
        for m in linear:
            stack.enter_context(m.frozen())
        for x, _ in tqdm(iterate_batches(loader, dev, batch_fn), desc="lstsq", disable=not progress, leave=False):
            reps = plan.frozen_outputs(x)
            for fit, provided, expected in zip(fits, plan.provided_keys, plan.expected_keys):
                fit.update(reps[provided].float(), reps[expected].float())
    for fit in fits:
        fit.solve(ridge)
    return fits[0].rows
