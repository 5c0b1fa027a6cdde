"""Layer 2, stitches: the shape rules, the stitch modules, the stitched model and least squares.

`make_stitch` builds a `Stitch` from two layer specs (its *kind* says how it
maps shapes); `stitch` probes two networks, builds the stitch and cuts the
receiver into a `StitchedModel`; `LeastSquares`/`fit_least_squares` give a
linear stitch its closed-form initialisation.
"""

from ._lstsq import JointLeastSquares, LeastSquares, fit_least_squares, fit_least_squares_all
from ._modules import (
    STITCH_KINDS,
    MapToTokens,
    Resize,
    Stitch,
    TokenBatchNorm,
    TokenResample,
    TokensToMap,
    identity_,
    make_stitch,
)
from ._stitched import StitchedModel, assemble, stitch
from ._tokens import TokenLayout, token_layout

__all__ = [
    "STITCH_KINDS",
    "JointLeastSquares",
    "LeastSquares",
    "MapToTokens",
    "Resize",
    "Stitch",
    "StitchedModel",
    "TokenBatchNorm",
    "TokenLayout",
    "TokenResample",
    "TokensToMap",
    "assemble",
    "fit_least_squares",
    "fit_least_squares_all",
    "identity_",
    "make_stitch",
    "stitch",
    "token_layout",
]
