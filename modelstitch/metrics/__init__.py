"""Similarity measures between two representations of the same inputs.

Each full-batch measure takes ``X [N, p]`` and ``Y [N, q]`` (torch tensors on any device, or numpy arrays),
where row ``i`` of both comes from input ``i``, works in float64 and returns a Python float:

- `linear_cka`, `rbf_cka`: centred kernel alignment (Kornblith et al. 2019), biased or debiased.
- `cca` (mean squared canonical correlation), `svcca` (Raghu et al. 2017), `pwcca` (Morcos et al. 2018).
- `procrustes`: orthogonal Procrustes distance (Ding et al. 2021); a distance, 0 = alike.
- `linear_regression_r2`: fraction of Y's variance a linear map of X explains (asymmetric).
- `mutual_knn`: mutual nearest-neighbour alignment (Huh et al. 2024).

`MEASURES` maps each name to its function. `flatten_features` turns feature maps ``[N, C, H, W]`` or tokens
``[N, T, D]`` into ``[N, features]``. `MinibatchCKA` accumulates linear CKA between every layer of one
network and every layer of another over minibatches (Nguyen et al. 2021), keeping only ``La x Lb``
accumulators in memory. `compare_layers` runs two networks over a dataset and returns every measure for every
pair of their layers (what a `Study` with ``measures=`` and ``modelstitch compare`` use).

Examples:
    >>> import numpy as np
    >>> from modelstitch import metrics
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 16))
    >>> Q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    >>> Y = 2 * X @ Q  # X rotated and scaled
    >>> {name: round(measure(X, Y), 4) for name, measure in metrics.MEASURES.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'linear_cka': 1.0, 'rbf_cka': 1.0, 'cca': 1.0, 'svcca': 1.0, 'pwcca': 1.0, 'procrustes': 0.0,
     'linear_regression_r2': 1.0, 'mutual_knn': 1.0}
"""

from ._compare import LAYER_MEASURES, LAYER_RULES, compare_layers
from ._inputs import FLATTEN_RULES, flatten_features
from ._measures import (
    MEASURES,
    cca,
    linear_cka,
    linear_regression_r2,
    mutual_knn,
    procrustes,
    pwcca,
    rbf_cka,
    svcca,
)
from ._streaming import MinibatchCKA

__all__ = [
    "FLATTEN_RULES",
    "LAYER_MEASURES",
    "LAYER_RULES",
    "MEASURES",
    "MinibatchCKA",
    "cca",
    "compare_layers",
    "flatten_features",
    "linear_cka",
    "linear_regression_r2",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "svcca",
]
