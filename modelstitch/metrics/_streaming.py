"""Minibatch CKA between every layer of one network and every layer of another, accumulated batch by batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._errors import StitchError
from ._inputs import FLATTEN_RULES, flatten_features
from ._kernels import double_center, hsic_normalizer, u_center

__all__ = ["MinibatchCKA"]


class MinibatchCKA:
    """Linear CKA for all layer pairs of two networks, streamed over minibatches (Nguyen et al. 2021).

    For each batch of ``b`` inputs, every layer's features ``[b, ...]`` are flattened to ``[b, p]`` (by
    `flatten_features` and ``rule``), centred over the batch, and turned into a linear Gram ``[b, b]``. The
    Grams of network A are stacked into ``KA [La, b, b]`` and those of B into ``KB [Lb, b, b]``, centred
    (U-centred for the unbiased HSIC of Song et al. 2012, or double-centred for the biased one), and the
    HSIC of every pair comes from one matrix product of the flattened Grams,
    ``KA.reshape(La, b*b) @ KB.reshape(Lb, b*b).T``: no loop over layer pairs. The sums
    ``hsic_ab [La, Lb]``, ``hsic_aa [La]`` and ``hsic_bb [Lb]`` are accumulated in float64, and
    ``CKA[i, j] = mean hsic_ab[i, j] / sqrt(mean hsic_aa[i] * mean hsic_bb[j])``, the minibatch CKA of
    Nguyen et al. With the unbiased estimator this converges to the full-data CKA as batches accumulate, for
    any batch size; the biased one is inflated by roughly ``1 / b`` (unrelated layers get about
    ``p / b``, not 0).

    Memory: the three accumulators (``La * Lb + La + Lb`` floats) plus one batch's Grams
    (``(La + Lb) * b^2`` floats) while ``update`` runs; no features are kept between batches. Time per batch:
    ``O(b^2 * (sum of layer widths) + La * Lb * b^2)``.

    Invariant to: per layer, orthogonal transforms and isotropic scaling of the flattened features, and
    translation (as `linear_cka`).

    Grams are computed in the features' precision (float32 features give float32 Grams, after centring, which
    keeps them accurate; pass float64 features or ``gram_dtype=torch.float64`` for full precision); the
    centring and everything after it are float64. The accumulators live on the device of the first batch.

    Args:
        debiased: unbiased HSIC per batch (needs batches of at least 4); ``False`` gives the biased estimator
            (batches of at least 2), which costs the same and is inflated by about ``1 / b``.
        rule: how `flatten_features` turns ``[b, C, H, W]`` maps or ``[b, T, D]`` tokens into ``[b, p]``.
        gram_dtype: dtype of the Gram products; ``None`` uses the features' dtype (at least float32).

    Attributes:
        hsic_ab: float64 tensor ``[La, Lb]``, summed HSIC over batches (``None`` before the first update).
        hsic_aa: float64 tensor ``[La]``.
        hsic_bb: float64 tensor ``[Lb]``.
        num_batches: batches seen.
        num_samples: samples seen.
        layers_a: the keys of the first ``feats_a`` mapping, or ``None`` if sequences were given.
        layers_b: likewise for ``feats_b``.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> cka = MinibatchCKA()
        >>> for _ in range(4):
        ...     x = torch.randn(32, 8, generator=g)
        ...     cka.update([x, x.relu()], [2 * x, torch.randn(32, 3, 4, 4, generator=g)])
        >>> cka.compute().round(1)  # rows: x, relu(x); columns: 2x, unrelated noise
        array([[1. , 0. ],
               [0.7, 0. ]])
    """

    def __init__(self, *, debiased: bool = True, rule: str = "flatten", gram_dtype: torch.dtype | None = None):
        if not isinstance(debiased, bool):
            raise StitchError(f"MinibatchCKA: debiased must be True or False, got {debiased!r}")
        if rule not in FLATTEN_RULES:
            raise StitchError(f"MinibatchCKA: unknown rule {rule!r}; choose one of {list(FLATTEN_RULES)}")
        if gram_dtype is not None and gram_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise StitchError(f"MinibatchCKA: gram_dtype must be a floating dtype, got {gram_dtype!r}")
        self.debiased = debiased
        self.rule = rule
        self.gram_dtype = gram_dtype
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.hsic_ab: torch.Tensor | None = None
        self.hsic_aa: torch.Tensor | None = None
        self.hsic_bb: torch.Tensor | None = None
        self.num_batches = 0
        self.num_samples = 0
        self.layers_a: list[str] | None = None
        self.layers_b: list[str] | None = None

    def __repr__(self) -> str:
        shape = None if self.hsic_ab is None else tuple(self.hsic_ab.shape)
        return (
            f"MinibatchCKA(debiased={self.debiased}, rule={self.rule!r}, layers={shape}, "
            f"batches={self.num_batches}, samples={self.num_samples})"
        )

    # ------------------------------------------------------------------ accumulating

    def _grams(self, feats: Any, side: str) -> tuple[list[str] | None, torch.Tensor]:
        """Stacked centred-feature linear Grams ``[L, b, b]`` (float64) for one network's layers."""
        if isinstance(feats, Mapping):
            names: list[str] | None = [str(k) for k in feats]
            tensors = list(feats.values())
        elif isinstance(feats, Sequence) and not isinstance(feats, (str, bytes)):
            names, tensors = None, list(feats)
        else:
            raise StitchError(
                f"MinibatchCKA.update: {side} must be a sequence or a mapping of tensors [b, ...], "
                f"got {type(feats).__name__}"
            )
        if not tensors:
            raise StitchError(f"MinibatchCKA.update: {side} holds no layers")
        grams = []
        for i, t in enumerate(tensors):
            label = f"{side}[{names[i]!r}]" if names is not None else f"{side}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise StitchError(f"MinibatchCKA.update: {label} is a {type(t).__name__}, not a torch tensor")
            if t.is_complex():
                raise StitchError(f"MinibatchCKA.update: {label} has dtype {t.dtype}; real features are needed")
            x = flatten_features(t.detach(), self.rule)
            dtype = self.gram_dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
            x = x.to(dtype)
            x = x - x.mean(dim=0, keepdim=True)
            grams.append((x @ x.T).to(torch.float64))
        sizes = {g.shape[0] for g in grams}
        if len(sizes) > 1:
            raise StitchError(f"MinibatchCKA.update: the layers of {side} have different batch sizes {sorted(sizes)}")
        devices = {g.device for g in grams}
        if len(devices) > 1:
            raise StitchError(f"MinibatchCKA.update: the layers of {side} are on different devices {devices}")
        return names, torch.stack(grams)

    @torch.no_grad()
    def update(
        self,
        feats_a: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        feats_b: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    ) -> None:
        """Add one batch: the same ``b`` inputs seen by every layer of both networks.

        Args:
            feats_a: network A's layer outputs, each ``[b, ...]`` (a list, or a mapping such as
                ``modelstitch.activations(...)`` returns; its order fixes the rows of the result).
            feats_b: network B's layer outputs, each ``[b, ...]``; they fix the columns.

        Raises:
            StitchError: a batch smaller than 4 (2 when biased), layers with different batch sizes or
                devices, a layer count that differs from earlier batches, or NaN/infinite features.
        """
        names_a, ka = self._grams(feats_a, "feats_a")
        names_b, kb = self._grams(feats_b, "feats_b")
        b = ka.shape[-1]
        if kb.shape[-1] != b:
            raise StitchError(f"MinibatchCKA.update: feats_a has batch size {b} but feats_b has {kb.shape[-1]}")
        if ka.device != kb.device:
            raise StitchError(f"MinibatchCKA.update: feats_a is on {ka.device} but feats_b on {kb.device}")
        smallest = 4 if self.debiased else 2
        if b < smallest:
            raise StitchError(
                f"MinibatchCKA.update: batch of {b} samples; the {'unbiased' if self.debiased else 'biased'} "
                f"HSIC estimator needs at least {smallest} (drop or merge the last small batch)"
            )
        if not (bool(torch.isfinite(ka).all()) and bool(torch.isfinite(kb).all())):
            raise StitchError("MinibatchCKA.update: the features contain NaN or infinite values")
        for side, names, known in (("feats_a", names_a, self.layers_a), ("feats_b", names_b, self.layers_b)):
            if self.hsic_ab is not None and names is not None and known is not None and names != known:
                raise StitchError(
                    f"MinibatchCKA.update: {side} has layers {names}, but earlier batches had {known}; "
                    "pass the same layers in the same order, or call reset()"
                )
        if self.hsic_ab is not None and (ka.shape[0], kb.shape[0]) != tuple(self.hsic_ab.shape):
            raise StitchError(
                f"MinibatchCKA.update: got {ka.shape[0]} x {kb.shape[0]} layers, but earlier batches had "
                f"{self.hsic_ab.shape[0]} x {self.hsic_ab.shape[1]}; call reset() to start over"
            )
        center = u_center if self.debiased else double_center
        scale = hsic_normalizer(b, self.debiased)
        flat_a = center(ka).reshape(ka.shape[0], b * b)
        flat_b = center(kb).reshape(kb.shape[0], b * b)
        ab = flat_a @ flat_b.T / scale
        aa = flat_a.square().sum(dim=1) / scale
        bb = flat_b.square().sum(dim=1) / scale
        if self.hsic_ab is None:
            self.hsic_ab, self.hsic_aa, self.hsic_bb = ab, aa, bb
            self.layers_a, self.layers_b = names_a, names_b
        else:
            self.hsic_ab += ab.to(self.hsic_ab.device)
            self.hsic_aa += aa.to(self.hsic_aa.device)
            self.hsic_bb += bb.to(self.hsic_bb.device)
        self.num_batches += 1
        self.num_samples += b

    # ------------------------------------------------------------------ result

    def compute(self) -> np.ndarray:
        """The minibatch CKA of every pair so far.

        Returns:
            float64 array ``[La, Lb]``: row ``i`` is layer ``i`` of network A, column ``j`` layer ``j`` of B.
            Biased values are in [0, 1]; debiased ones in [-1, 1], near 0 for unrelated layers.

        Raises:
            StitchError: no batch yet, or a layer whose features never varied within a batch (CKA undefined).
        """
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            raise StitchError("MinibatchCKA.compute: no batches yet; call update(feats_a, feats_b) first")
        for side, self_hsic, names in (("A", self.hsic_aa, self.layers_a), ("B", self.hsic_bb, self.layers_b)):
            bad = [i for i, v in enumerate(self_hsic.tolist()) if not v > 0]
            if bad:
                labels = [names[i] for i in bad] if names is not None else bad
                raise StitchError(
                    f"MinibatchCKA.compute: layers {labels} of network {side} have HSIC <= 0 with themselves "
                    "(constant within every batch, or too few samples), so their CKA is undefined"
                )
        denom = torch.sqrt(torch.outer(self.hsic_aa, self.hsic_bb))
        cka = (self.hsic_ab / denom).clamp(-1.0 if self.debiased else 0.0, 1.0)
        return cka.cpu().numpy()

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(La, Lb)`` once a batch has been seen."""
        return None if self.hsic_ab is None else (int(self.hsic_ab.shape[0]), int(self.hsic_ab.shape[1]))
