"""Gram matrices and their centring, batched over leading axes (shared by the full-batch and streaming CKA)."""

from __future__ import annotations

import torch

from .._errors import StitchError

__all__ = ["double_center", "hsic_normalizer", "rbf_gram", "squared_distances", "u_center"]


def double_center(gram: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T/n``, for Grams ``[..., n, n]``: the biased HSIC's centring."""
    row = gram.mean(dim=-1, keepdim=True)
    col = gram.mean(dim=-2, keepdim=True)
    return gram - row - col + row.mean(dim=-2, keepdim=True)


def u_center(gram: torch.Tensor) -> torch.Tensor:
    """U-centre symmetric Grams ``[..., n, n]`` (n >= 4): the unbiased HSIC's centring.

    Szekely & Rizzo (2014): zero the diagonal, subtract row means taken over ``n - 2`` and corrected by the
    grand mean, zero the diagonal again. For two U-centred Grams, ``<K~, L~> / (n (n - 3))`` is Song et
    al.'s (2012) unbiased HSIC estimator, and ``<K~, K~> >= 0`` always. The result does not change when a
    constant is added to every feature, so features may be centred first for numerical accuracy.
    """
    n = gram.shape[-1]
    out = gram.clone()
    out.diagonal(dim1=-2, dim2=-1).zero_()
    means = out.sum(dim=-1) / (n - 2)
    means = means - means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    out = out - means[..., :, None] - means[..., None, :]
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def hsic_normalizer(n: int, debiased: bool) -> float:
    """What ``<centred K, centred L>`` is divided by to give HSIC: ``n (n - 3)`` unbiased, ``(n - 1)^2`` biased."""
    return float(n * (n - 3)) if debiased else float((n - 1) ** 2)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, N]`` between the rows of ``x`` ``[N, p]``, exactly 0 on the diagonal."""
    dots = x @ x.T
    sq_norms = dots.diagonal()
    d = (sq_norms[:, None] + sq_norms[None, :] - 2 * dots).clamp_(min=0)
    d.diagonal().zero_()
    return d


def rbf_gram(x: torch.Tensor, threshold: float, *, name: str = "X", measure: str = "rbf_cka") -> torch.Tensor:
    """Kornblith et al.'s RBF Gram ``[N, N]`` for ``x`` ``[N, p]``.

    ``exp(-d_ij^2 / (2 sigma^2))`` with ``sigma^2 = threshold^2 * median(d^2)``, the median taken over all
    ``N^2`` entries of the squared-distance matrix, its zero diagonal included, and averaging the two middle
    values when there is an even number of entries (``np.median``'s convention), exactly as the reference code
    of Kornblith et al. (2019) does.
    """
    d = squared_distances(x)
    flat = d.reshape(-1)
    m = flat.numel()
    lower = flat.kthvalue((m + 1) // 2).values
    median = lower if m % 2 else (lower + flat.kthvalue(m // 2 + 1).values) / 2
    if float(median) <= 0:
        raise StitchError(
            f"{measure}: the median squared distance between the rows of {name} is 0 (at least half of all "
            "pairs of samples coincide), so the RBF bandwidth is undefined; remove duplicated samples"
        )
    return torch.exp(-d / (2 * threshold**2 * median))
