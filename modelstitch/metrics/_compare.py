"""`compare_layers`: similarity measures between every layer of one network and every layer of another."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import StitchError
from ..core import BatchFn, Positions, activations, as_loader, frozen, iterate_batches, position_mask, resolve_device
from ._inputs import FLATTEN_RULES, flatten_features
from ._measures import MEASURES
from ._streaming import MinibatchCKA

__all__ = ["LAYER_MEASURES", "LAYER_RULES", "compare_layers"]

_CKA = ("cka", "linear_cka", "rbf_cka")

LAYER_MEASURES: tuple[str, ...] = ("cka", *MEASURES)
"""Names `compare_layers` accepts: ``"cka"`` (debiased linear CKA streamed over minibatches, any number of
samples) and every full-batch measure of `MEASURES` (computed on the first ``max_samples`` samples)."""

LAYER_RULES: tuple[str, ...] = (*FLATTEN_RULES, "positions")
"""The rules `compare_layers` accepts: `flatten_features`'s, and ``"positions"`` (each counted token a sample)."""


@torch.no_grad()
def compare_layers(
    sender: nn.Module,
    sender_layers: Sequence[str],
    receiver: nn.Module,
    receiver_layers: Sequence[str],
    data: Any,
    *,
    measures: Sequence[str] = ("cka",),
    rule: str | None = None,
    max_samples: int = 2000,
    batch_size: int = 256,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = "auto",
    positions: Positions | None = None,
) -> dict[str, np.ndarray]:
    """Each measure between every sender layer and every receiver layer, in one pass over ``data``.

    Both networks run frozen (eval mode, no gradient) on the same batches, and
    every requested layer of each is captured in that one forward. ``"cka"``
    accumulates the unbiased HSIC of all layer pairs batch by batch
    (`MinibatchCKA`), so it sees every sample and keeps only its accumulators;
    the full-batch measures keep the flattened features of the first
    ``max_samples`` samples of each layer (on the CPU, float32) and are
    computed pair by pair at the end.

    Args:
        sender: the first network (rows of each matrix).
        sender_layers: its layer addresses.
        receiver: the second network (columns).
        receiver_layers: its layer addresses.
        data: a Dataset, DataLoader or iterable of ``(inputs, labels)`` batches.
        measures: names from `LAYER_MEASURES`.
        rule: how maps ``[B, C, H, W]`` and tokens ``[B, T, D]`` become
            ``[B, features]`` (see `flatten_features`), or ``"positions"``:
            every token position that counts (`modelstitch.core.position_mask`
            of the batch: not padding, and kept by ``positions``) is one
            sample ``[D]``, at most 1,024 of them per batch (a seeded draw,
            the same for every layer). ``None`` picks ``"positions"``
            for batches of token dicts (``input_ids``: language models), and
            otherwise per measure: ``"flatten"`` for the CKA family (as
            Kornblith et al.), ``"mean"`` (spatial or token mean) for the
            others, which fit a map per feature and overfit when features
            outnumber samples (the CCA family of ``8 x 32 x 32`` flattened
            maps on a few thousand images is 1 for any pair).
        max_samples: samples kept for the full-batch measures.
        batch_size: batch size when ``data`` is a Dataset (at least 4 for ``"cka"``).
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        device: where the networks run.
        positions: with the ``"positions"`` rule, what besides padding to
            leave out (`modelstitch.core.Positions`; ``None``: padding only).

    Returns:
        ``{measure: float64 array [len(sender_layers), len(receiver_layers)]}``.

    Raises:
        StitchError: an unknown measure or rule, or data a measure cannot use.

    Examples:
        >>> net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(32, 6), torch.zeros(32)) for _ in range(4)]
        >>> out = compare_layers(net, ["0", "2"], net, ["0", "2"], data, measures=("cka", "cca"), device="cpu")
        >>> out["cka"].shape, round(float(out["cka"][0, 0]), 4), round(float(out["cca"][1, 1]), 4)
        ((2, 2), 1.0, 1.0)
    """
    unknown = [m for m in measures if m not in LAYER_MEASURES]
    if unknown or not measures:
        raise StitchError(f"unknown measures {unknown or list(measures)}; choose from {list(LAYER_MEASURES)}")
    if rule is not None and rule not in LAYER_RULES:
        raise StitchError(f"unknown rule {rule!r}; choose one of {list(LAYER_RULES)} or None")
    dev = resolve_device(device)
    loader = as_loader(data, batch_size=batch_size, shuffle=False)
    batches = iterate_batches(loader, dev, batch_fn, what="the data the measures read")
    first = next(batches, None)
    if rule is None and first is not None and isinstance(first[0], dict) and "input_ids" in first[0]:
        rule = "positions"  # tokens of a language model: each counted position is a sample
    rules = {m: rule or ("flatten" if m in _CKA else "mean") for m in measures}
    sender.to(dev)
    receiver.to(dev)
    # "positions" hands each measure [n, D] rows, which every flatten rule leaves as they are
    streaming = MinibatchCKA(rule=_flat(rules["cka"])) if "cka" in measures else None
    full = [m for m in measures if m != "cka"]
    full_rules = sorted({rules[m] for m in full})
    kept: dict[tuple[str, str], list[list[torch.Tensor]]] = {
        (side, r): [[] for _ in layers]
        for r in full_rules
        for side, layers in (("a", sender_layers), ("b", receiver_layers))
    }
    seen = 0
    with frozen(sender, receiver):
        for number, (x, _) in enumerate(itertools.chain([first] if first is not None else [], batches)):
            acts_a = activations(sender, x, list(sender_layers))
            acts_b = activations(receiver, x, list(receiver_layers))
            feats_a = [acts_a[layer] for layer in sender_layers]
            feats_b = [acts_b[layer] for layer in receiver_layers]
            if rule == "positions":
                feats_a, feats_b = _counted_positions(x, feats_a, feats_b, positions, _POSITIONS_PER_BATCH, number)
            if streaming is not None:
                streaming.update(feats_a, feats_b)
            take = min(max_samples - seen, feats_a[0].shape[0])
            if full and take > 0:
                for (side, r), stores in kept.items():
                    for store, f in zip(stores, feats_a if side == "a" else feats_b):
                        store.append(flatten_features(f[:take], _flat(r)).float().cpu())
            seen += take
    if seen == 0:
        raise StitchError("compare_layers: the data yields no samples")
    out: dict[str, np.ndarray] = {}
    if streaming is not None:
        out["cka"] = streaming.compute()
    for name in full:
        xs = [torch.cat(parts) for parts in kept["a", rules[name]]]
        ys = [torch.cat(parts) for parts in kept["b", rules[name]]]
        out[name] = np.array([[MEASURES[name](x, y) for y in ys] for x in xs], dtype=np.float64)
    return {m: out[m] for m in measures}


_POSITIONS_PER_BATCH = 1024
"""Token rows per batch under the ``"positions"`` rule: a streamed CKA keeps a Gram matrix of this side per layer."""


def _flat(rule: str) -> str:
    """The `flatten_features` rule of a `compare_layers` rule (``"positions"`` rows are ``[n, D]`` already)."""
    return "flatten" if rule == "positions" else rule


def _counted_positions(
    inputs: Any,
    feats_a: list[torch.Tensor],
    feats_b: list[torch.Tensor],
    positions: Positions | None,
    limit: int,
    number: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's token rows ``[n, D]`` at the positions of the batch that count, the same for every layer.

    At most ``limit`` positions are kept: a draw seeded by the batch ``number``, so a rerun sees the same rows.

    Raises:
        StitchError: a layer's output is not tokens ``[B, T, D]`` of the batch's ``[B, T]``.
    """
    for f in (*feats_a, *feats_b):
        if f.dim() != 3 or f.shape[:2] != feats_a[0].shape[:2]:
            raise StitchError(
                f"rule 'positions' reads token sequences [B, T, D] of one [B, T]; a layer gave {tuple(f.shape)} "
                f"where the first gave {tuple(feats_a[0].shape)}; use another rule for maps or vectors"
            )
    mask = position_mask(inputs, [*feats_a, *feats_b], positions)
    flat = torch.ones(feats_a[0].shape[:2], dtype=torch.bool, device=feats_a[0].device) if mask is None else mask
    index = flat.reshape(-1).nonzero().squeeze(1)
    if index.numel() > limit:
        order = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(number))[:limit]
        index = index[order.sort().values.to(index.device)]
    rows = [f.reshape(-1, f.shape[-1])[index] for f in (*feats_a, *feats_b)]
    return rows[: len(feats_a)], rows[len(feats_a) :]
