"""Layer 3, training: the recipe, the one optimisation loop, the activation cache, evaluation.

`train_stitch`/`train_stitches` train stitches with the sender and receiver
frozen (many cells per pass over the data, optionally from an
`ActivationCache`); `evaluate`/`evaluate_stitches` measure accuracy;
`optimise` is the loop that stitch and classifier training share.
"""

from ._cache import ActivationCache
from ._evaluate import evaluate, evaluate_stitches, stitching_penalty
from ._init import fit_least_squares_all
from ._loop import StepLosses, optimise, total_steps
from ._plan import LossFn, Plan, cross_entropy
from ._recipe import Recipe
from ._select import BestEpoch, holdout_split
from ._train import Objective, TrainResult, train_stitch, train_stitches

__all__ = [
    "ActivationCache",
    "BestEpoch",
    "LossFn",
    "Objective",
    "Plan",
    "Recipe",
    "StepLosses",
    "TrainResult",
    "cross_entropy",
    "evaluate",
    "evaluate_stitches",
    "fit_least_squares_all",
    "holdout_split",
    "optimise",
    "stitching_penalty",
    "total_steps",
    "train_stitch",
    "train_stitches",
]
