"""Full-batch similarity measures between two representations ``X [N, p]`` and ``Y [N, q]`` of the same inputs.

Every measure accepts torch tensors (CPU or CUDA; the work stays on that device) or numpy arrays, computes in
float64 without autograd, and returns a Python float. Row ``i`` of ``X`` and of ``Y`` must come from the same
input. A measure that is undefined for its inputs (fewer samples than it needs, an input that does not vary
across samples, NaN) raises `StitchError` instead of returning NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._errors import StitchError
from ._inputs import as_pair, centered
from ._kernels import double_center, rbf_gram, squared_distances, u_center

__all__ = [
    "MEASURES",
    "cca",
    "linear_cka",
    "linear_regression_r2",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "svcca",
]

_EPS = torch.finfo(torch.float64).eps
# A debiased self-HSIC at or below this fraction of the biased one is treated as zero (nothing left to compare).
_DEGENERATE_RTOL = 1e-12


# --------------------------------------------------------------------------- helpers


def _check_flag(value: object, name: str, measure: str) -> bool:
    if not isinstance(value, bool):
        raise StitchError(f"{measure}: {name} must be True or False, got {value!r}")
    return value


def _check_fraction(value: object, name: str, measure: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value <= high):
        raise StitchError(f"{measure}: {name} must be a number in ({low}, {high}], got {value!r}")
    return float(value)


def _numerical_rank(s: torch.Tensor, shape: torch.Size) -> int:
    """How many singular values ``s`` (descending) are above numpy's ``matrix_rank`` tolerance."""
    if s.numel() == 0:
        return 0
    tol = float(s[0]) * max(shape) * _EPS
    return int((s > tol).sum())


def _basis(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``[N, r]`` of the column space of ``xc`` and its singular values ``[r]`` (numerical rank r).

    Dropping the directions with (numerically) zero singular values is what makes the CCA family well defined
    for constant or duplicated columns: whitening never divides by zero.
    """
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    r = _numerical_rank(s, xc.shape)
    return u[:, :r], s[:r]


def _compact(xc: torch.Tensor) -> torch.Tensor:
    """A matrix ``[N, min(N, p)]`` with the same Gram ``xc xc^T`` (a right rotation of ``xc``; cheaper when p > N)."""
    n, p = xc.shape
    if p <= n:
        return xc
    r = torch.linalg.qr(xc.T, mode="r").R  # xc^T = Q R, so xc = R^T Q^T with Q^T Q = I
    return r.T


def _canonical(xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA by SVD-based whitening: ``(ux [N, rx], a [rx, m], rho [m])`` with ``m = min(rx, ry)``.

    ``ux @ a`` are the canonical variates of X (unit-norm, orthogonal, ``[N, m]``) and ``rho`` the canonical
    correlations in decreasing order, clipped to [0, 1] against rounding.
    """
    ux, _ = _basis(xc)
    uy, _ = _basis(yc)
    a, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return ux, a, rho.clamp(0.0, 1.0)


def _linear_hsic_terms(xc: torch.Tensor, yc: torch.Tensor, debiased: bool) -> tuple[float, float, float, float, float]:
    """``(hsic_xy, hsic_xx, hsic_yy, biased_xx, biased_yy)`` for the linear kernel on centred features, unnormalised.

    Uses whichever of ``X^T Y`` (feature space) and ``X X^T`` (sample space) is cheaper. The debiased terms are
    Kornblith et al.'s feature-space form of the unbiased HSIC, times ``n (n - 3)``.
    """
    n, p = xc.shape
    q = yc.shape[1]
    if p * q + p * p + q * q <= n * (p + q):
        xty = (xc.T @ yc).square().sum()
        xtx = (xc.T @ xc).square().sum()
        yty = (yc.T @ yc).square().sum()
    else:
        k, l_ = xc @ xc.T, yc @ yc.T
        xty, xtx, yty = (k * l_).sum(), k.square().sum(), l_.square().sum()
    if not debiased:
        return float(xty), float(xtx), float(yty), float(xtx), float(yty)
    rows_x, rows_y = xc.square().sum(dim=1), yc.square().sum(dim=1)

    def unbiased(dot: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor) -> float:
        return float(dot - n / (n - 2) * (ra @ rb) + ra.sum() * rb.sum() / ((n - 1) * (n - 2)))

    return (
        unbiased(xty, rows_x, rows_y),
        unbiased(xtx, rows_x, rows_x),
        unbiased(yty, rows_y, rows_y),
        float(xtx),
        float(yty),
    )


def _cka_ratio(hxy: float, hxx: float, hyy: float, bxx: float, byy: float, measure: str) -> float:
    for name, h, b in (("X", hxx, bxx), ("Y", hyy, byy)):
        if not h > _DEGENERATE_RTOL * b:
            raise StitchError(
                f"{measure}: the debiased HSIC of {name} with itself is {h:.3g} (not positive), so debiased CKA "
                "is undefined for these samples; use more samples or debiased=False"
            )
    value = hxy / math.sqrt(hxx * hyy)
    return min(1.0, max(-1.0, value))


# --------------------------------------------------------------------------- CKA


def linear_cka(X: Any, Y: Any, *, debiased: bool = False) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019).

    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear Grams ``K = X X^T`` and ``L = Y Y^T`` of the
    column-centred inputs. Biased HSIC is ``<HKH, HLH>`` (``H`` the centring matrix), so the value is
    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. With ``debiased=True`` each HSIC is Song et al.'s (2012)
    unbiased estimator, as used by Nguyen et al. (2021): the biased one is inflated by about ``1/N`` for
    unrelated features, the debiased one is near 0 for them at any ``N`` (and may be slightly negative).
    The cheaper of the feature-space (``p, q`` small) and sample-space (``N`` small) forms is used.

    Invariant to: orthogonal transforms and isotropic scaling of either input, and translation; not to other
    invertible linear maps.

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``, the same N inputs in the same order.
        debiased: use the unbiased HSIC estimator (needs N >= 4).

    Returns:
        A float in [0, 1] (debiased: in [-1, 1]); 1 when ``Y`` is a rotation and scaling of ``X``.

    Raises:
        StitchError: N < 2 (N < 4 when debiased), an input that does not vary across samples, NaN or infinite
            values, mismatched N or devices.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((100, 10))
        >>> Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
        >>> round(linear_cka(X, 3 * X @ Q), 6)
        1.0
        >>> abs(linear_cka(X, rng.standard_normal((100, 10)), debiased=True)) < 0.05  # unrelated features
        True
    """
    measure = "linear_cka"
    debiased = _check_flag(debiased, "debiased", measure)
    with torch.no_grad():
        x, y = as_pair(X, Y, measure, min_samples=4 if debiased else 2)
        xc, yc = centered(x, "X", measure), centered(y, "Y", measure)
        terms = _linear_hsic_terms(xc, yc, debiased)
    return _cka_ratio(*terms, measure) if debiased else min(1.0, max(0.0, terms[0] / math.sqrt(terms[1] * terms[2])))


def rbf_cka(X: Any, Y: Any, *, threshold: float = 1.0, debiased: bool = False) -> float:
    """CKA with Gaussian RBF kernels (Kornblith et al. 2019).

    ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` with ``sigma = threshold * sqrt(median(D))``, where ``D`` is
    the ``N x N`` matrix of squared distances and the median runs over all its entries, zero diagonal
    included (the heuristic of the authors' reference code; ``threshold`` is their "fraction of the median
    distance"). Likewise for ``Y``. Then ``<HKH, HLH> / (||HKH||_F ||HLH||_F)``, or with U-centred Grams
    (Szekely and Rizzo 2014) for the unbiased HSIC when ``debiased=True``. Costs ``O(N^2 (p + q))`` time and
    ``O(N^2)`` memory.

    Invariant to: orthogonal transforms and isotropic scaling of either input (the bandwidth scales along), and
    translation; not to other invertible linear maps.

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``.
        threshold: bandwidth as a fraction of the median distance; small values make the kernel local.
        debiased: use the unbiased HSIC estimator (needs N >= 4).

    Returns:
        A float in [0, 1] (debiased: in [-1, 1]).

    Raises:
        StitchError: as `linear_cka`; also a non-positive threshold, or a median squared distance of 0 (at
            least half of all pairs of samples coincide).

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((50, 4))
        >>> round(rbf_cka(X, X + 5, threshold=0.5), 6)
        1.0
    """
    measure = "rbf_cka"
    debiased = _check_flag(debiased, "debiased", measure)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
        raise StitchError(f"{measure}: threshold must be a positive number, got {threshold!r}")
    with torch.no_grad():
        x, y = as_pair(X, Y, measure, min_samples=4 if debiased else 2)
        xc, yc = centered(x, "X", measure), centered(y, "Y", measure)
        center = u_center if debiased else double_center
        k = center(rbf_gram(xc, threshold, name="X", measure=measure))
        l_ = center(rbf_gram(yc, threshold, name="Y", measure=measure))
        hxy, hxx, hyy = float((k * l_).sum()), float(k.square().sum()), float(l_.square().sum())
    if not (hxx > 0 and hyy > 0):
        raise StitchError(f"{measure}: a centred RBF Gram matrix is zero, so CKA is undefined for these samples")
    value = hxy / math.sqrt(hxx * hyy)
    return min(1.0, max(-1.0 if debiased else 0.0, value))


# --------------------------------------------------------------------------- CCA family


def cca(X: Any, Y: Any) -> float:
    """Mean squared canonical correlation, ``R^2_CCA`` (as in Kornblith et al. 2019).

    Centre both inputs, take orthonormal bases ``Qx``, ``Qy`` of their column spaces by SVD (directions whose
    singular value is numerically zero are dropped, so constant or duplicated columns are harmless), and
    average the squares of the canonical correlations, the singular values of ``Qx^T Qy``, over the
    ``min(rank X, rank Y)`` canonical pairs: ``||Qx^T Qy||_F^2 / min(rank X, rank Y)``. (Kornblith's code
    divides by ``min(p, q)`` instead; the two agree for full-rank inputs.)

    Invariant to: any invertible linear map of either input, and translation.

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``.

    Returns:
        A float in [0, 1]. It reaches 1 whenever ``rank X + rank Y > N - 1``: with as many features as
        samples every representation is perfectly correlated with every other.

    Raises:
        StitchError: N < 2, an input that does not vary across samples, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((100, 5))
        >>> A = rng.standard_normal((5, 5))  # an invertible map, not a rotation
        >>> round(cca(X, X @ A + 1), 6)
        1.0
    """
    measure = "cca"
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        _, _, rho = _canonical(centered(x, "X", measure), centered(y, "Y", measure))
        return float(rho.square().mean())


def _leading_basis(xc: torch.Tensor, keep: float) -> torch.Tensor:
    """The fewest leading left singular vectors of ``xc`` whose variance reaches ``keep`` of the total."""
    u, s = _basis(xc)
    var = s.square()
    frac = var.cumsum(0) / var.sum()
    k = min(int((frac < keep - 1e-12).sum()) + 1, s.numel())
    return u[:, :k]


def svcca(X: Any, Y: Any, *, keep: float = 0.99) -> float:
    """Singular vector CCA (Raghu et al. 2017): mean canonical correlation after an SVD reduction.

    Centre each input, keep the fewest top singular directions that explain the fraction ``keep`` of its
    variance (sum of squared singular values), then run CCA between the two reduced representations and
    average the (unsquared) canonical correlations over the ``min(kx, ky)`` pairs.

    Invariant to: orthogonal transforms and isotropic scaling of either input, and translation; a general
    invertible linear map changes which directions pass the variance threshold, so it is not invariant to those
    (unless ``keep=1``, when it is plain mean CCA correlation).

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``.
        keep: fraction of variance to keep on each side, in (0, 1]; Raghu et al. use 0.99.

    Returns:
        A float in [0, 1].

    Raises:
        StitchError: N < 2, ``keep`` outside (0, 1], an input that does not vary, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((100, 8))
        >>> Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
        >>> round(svcca(X, 2 * X @ Q), 6)
        1.0
    """
    measure = "svcca"
    keep = _check_fraction(keep, "keep", measure, low=0.0, high=1.0)
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        ux = _leading_basis(centered(x, "X", measure), keep)
        uy = _leading_basis(centered(y, "Y", measure), keep)
        rho = torch.linalg.svdvals(ux.T @ uy).clamp(0.0, 1.0)
        return float(rho.mean())


def pwcca(X: Any, Y: Any) -> float:
    """Projection-weighted CCA (Morcos et al. 2018), weighted by how much of ``X`` each canonical variate accounts for.

    Run CCA between the centred inputs (as in `cca`), giving correlations ``rho_i`` and the canonical variates
    of X, ``h_i = X a_i`` (unit-norm sample vectors ``[N]``). Weight each by ``alpha_i = sum_j |<h_i, x_j>|``
    over the columns (neurons) ``x_j`` of the centred ``X``, normalise the weights to sum to 1, and return
    ``sum_i alpha_i rho_i``. Canonical directions that X's neurons actually use count more than ones that
    merely fit noise.

    The measure is asymmetric: the weights always come from the first argument ``X`` (the "provided"
    representation). Morcos et al.'s reference code instead weights by whichever side has fewer neurons, and
    does not centre the neurons before projecting; ``pwcca(Y, X)`` gives the other direction.

    Invariant to: translation; in ``X``, permutations and sign flips of neurons and isotropic scaling (not
    rotations); in ``Y``, any invertible linear map.

    Args:
        X: ``[N, p]``, the representation whose neurons weight the canonical correlations.
        Y: ``[N, q]``.

    Returns:
        A float in [0, 1].

    Raises:
        StitchError: N < 2, an input that does not vary, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((100, 6))
        >>> round(pwcca(X, X @ rng.standard_normal((6, 6))), 6)
        1.0
    """
    measure = "pwcca"
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        xc, yc = centered(x, "X", measure), centered(y, "Y", measure)
        ux, a, rho = _canonical(xc, yc)
        variates = ux @ a[:, : rho.numel()]  # [N, m]
        alpha = (variates.T @ xc).abs().sum(dim=1)  # [m]
        # a weighted mean of correlations in [0, 1]; the clamp only undoes rounding (1.0000000000000002 was seen)
        return float((alpha / alpha.sum() * rho).sum().clamp(0.0, 1.0))


# --------------------------------------------------------------------------- Procrustes and regression


def procrustes(X: Any, Y: Any) -> float:
    """Orthogonal Procrustes distance (as in Ding et al. 2021): ``2 - 2 ||X^T Y||_*``.

    Both inputs are centred and scaled to unit Frobenius norm; the narrower one is thought of as padded with
    zero columns (which changes nothing), and ``||.||_*`` is the nuclear norm (sum of singular values). The
    value equals ``min_Q ||X - Y Q||_F^2`` over orthogonal ``Q``: the squared distance that remains after the
    best rotation of ``Y`` onto ``X``. It is a *distance*: 0 means identical up to rotation, translation and
    scale, 2 means as different as possible. Its square root is a metric (it obeys the triangle inequality).

    Invariant to: orthogonal transforms and isotropic scaling of either input, and translation.

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``.

    Returns:
        A float in [0, 2]; lower means more similar.

    Raises:
        StitchError: N < 2, an input that does not vary, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((100, 10))
        >>> Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
        >>> round(procrustes(X, 0.5 * X @ Q + 2), 6)
        0.0
    """
    measure = "procrustes"
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        xc, yc = centered(x, "X", measure), centered(y, "Y", measure)
        xr, yr = _compact(xc / xc.norm()), _compact(yc / yc.norm())
        nuclear = float(torch.linalg.svdvals(xr.T @ yr).sum())
    return min(2.0, max(0.0, 2.0 - 2.0 * nuclear))


def _r2(xc: torch.Tensor, yc: torch.Tensor, ridge: float) -> float:
    u, s = _basis(xc)
    s2 = s.square()
    shrink = s2 / (s2 + ridge * s2[0])  # ridge relative to the largest eigenvalue of X^T X
    coef = u.T @ yc  # [r, q]
    residual = yc - u @ (shrink[:, None] * coef)
    return float(1.0 - residual.square().sum() / yc.square().sum())


def linear_regression_r2(X: Any, Y: Any, *, ridge: float = 1e-6, both: bool = False) -> float | tuple[float, float]:
    """Fraction of ``Y``'s variance explained by a linear map of ``X`` (least squares with intercept, small ridge).

    Fits ``Y ~ X B + c`` by ridge regression with penalty ``ridge * s_max^2`` (``s_max^2`` the largest eigenvalue
    of the centred ``X^T X``), over the numerical column space of ``X``, and returns the total R^2:
    ``1 - ||Y - Y_hat||_F^2 / ||Y - mean(Y)||_F^2`` (all of ``Y``'s columns pooled, so high-variance columns
    count more). In-sample: with ``p >= N - 1`` features ``X`` explains anything, and R^2 is about 1.

    The direction matters: this is how well ``X`` predicts ``Y`` (``X -> Y``). ``both=True`` also returns
    the reverse, ``Y -> X``.

    Invariant to: translation of either input; for ``X``, any invertible linear map (exactly so as ``ridge``
    goes to 0); for ``Y``, orthogonal transforms and isotropic scaling.

    Args:
        X: ``[N, p]``, the predictor.
        Y: ``[N, q]``, the target.
        ridge: penalty relative to ``s_max^2``, at least 0; the default only guards against ill-conditioning.
        both: return ``(r2(X -> Y), r2(Y -> X))`` instead of one float.

    Returns:
        A float in [0, 1], or a pair of them with ``both=True``.

    Raises:
        StitchError: N < 2, a negative ridge, an input that does not vary, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((200, 4))
        >>> Y = np.concatenate([X, rng.standard_normal((200, 4))], axis=1)  # half of Y is X, half is noise
        >>> forward, backward = linear_regression_r2(X, Y, both=True)
        >>> round(backward, 4), 0.4 < forward < 0.6
        (1.0, True)
    """
    measure = "linear_regression_r2"
    both = _check_flag(both, "both", measure)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
        raise StitchError(f"{measure}: ridge must be a number >= 0, got {ridge!r}")
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        xc, yc = centered(x, "X", measure), centered(y, "Y", measure)
        forward = min(1.0, max(0.0, _r2(xc, yc, float(ridge))))
        if not both:
            return forward
        return forward, min(1.0, max(0.0, _r2(yc, xc, float(ridge))))


# --------------------------------------------------------------------------- nearest neighbours


def _knn_indices(x: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    if metric == "cosine":
        z = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        similarity = z @ z.T
    else:
        similarity = -squared_distances(x)
    similarity.diagonal().fill_(-math.inf)  # never one's own neighbour
    return similarity.topk(k, dim=1).indices


def mutual_knn(X: Any, Y: Any, *, k: int = 10, metric: str = "cosine") -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    For each sample ``i``, find its ``k`` nearest other samples in ``X`` and in ``Y`` (the sample itself is
    excluded), and score ``|knn_X(i) & knn_Y(i)| / k``; return the mean over samples. ``metric="cosine"`` (the
    default, as in Huh et al.'s code, which L2-normalises features without centring them) ranks neighbours by
    cosine similarity; ``"euclidean"`` by Euclidean distance. Only the neighbour *ranks* matter. Ties are
    broken by ``torch.topk``. Costs ``O(N^2)`` memory.

    Invariant to: orthogonal transforms and isotropic scaling of either input, and any change of the data that
    keeps every sample's k nearest neighbours; ``"euclidean"`` also to translation (``"cosine"`` is not).

    Args:
        X: ``[N, p]`` tensor or array.
        Y: ``[N, q]``.
        k: neighbours per sample, ``1 <= k <= N - 1``; chance level is about ``k / (N - 1)``.
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        A float in [0, 1].

    Raises:
        StitchError: a bad ``k`` or metric, an input that does not vary, NaN or infinite values.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.standard_normal((60, 5))
        >>> Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
        >>> mutual_knn(X, 2 * X @ Q, k=5)
        1.0
    """
    measure = "mutual_knn"
    if metric not in ("cosine", "euclidean"):
        raise StitchError(f"{measure}: metric must be 'cosine' or 'euclidean', got {metric!r}")
    with torch.no_grad():
        x, y = as_pair(X, Y, measure)
        n = x.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
            raise StitchError(f"{measure}: k must be an int with 1 <= k <= N - 1 = {n - 1}, got {k!r}")
        centered(x, "X", measure), centered(y, "Y", measure)  # only to refuse inputs that do not vary
        mask_x = torch.zeros(n, n, dtype=torch.bool, device=x.device)
        mask_x.scatter_(1, _knn_indices(x, k, metric), True)
        mask_y = torch.zeros_like(mask_x).scatter_(1, _knn_indices(y, k, metric), True)
        return float((mask_x & mask_y).sum(dim=1).to(torch.float64).mean() / k)


MEASURES: dict[str, Callable[..., Any]] = {
    "linear_cka": linear_cka,
    "rbf_cka": rbf_cka,
    "cca": cca,
    "svcca": svcca,
    "pwcca": pwcca,
    "procrustes": procrustes,
    "linear_regression_r2": linear_regression_r2,
    "mutual_knn": mutual_knn,
}
"""Every full-batch measure by name: ``MEASURES[name](X, Y, **options) -> float``.

All are similarities (higher = more alike) except ``"procrustes"``, a distance (0 = alike). ``"pwcca"`` and
``"linear_regression_r2"`` are asymmetric (X is the provided / predicting side).
"""
