"""Layer 3, training: the recipe, the one optimisation loop, the activation cache, evaluation.

`train_stitch`/`train_stitches` train stitches with the sender and receiver
frozen (many cells per pass over the data, optionally from an
`ActivationCache`); `evaluate`/`evaluate_stitches` measure accuracy;
`optimise` is the loop that stitch and classifier training share.
"""

from ..stitches import fit_least_squares_all  # the least-squares start of train_stitches, at home in stitches
from ._cache import ActivationCache
from ._evaluate import evaluate, evaluate_stitches, stitching_penalty
from ._loop import StepLosses, optimise, total_steps
from ._plan import OBJECTIVES, LossFn, Plan, kl_to
from ._precondition import DAMPING, Preconditioner
from ._recipe import UPSAMPLED, Recipe
from ._scores import SCORES, score_stitches
from ._select import MIN_HOLDOUT, RISING, RISING_Z, BestEpoch, holdout_size, holdout_split
from ._task import IGNORE_INDEX, Task, cross_entropy, logits_of, task_of
from ._train import MIN_STEPS, MIN_WHITENED_STEPS, Objective, TrainResult, train_stitch, train_stitches

__all__ = [
    "DAMPING",
    "IGNORE_INDEX",
    "MIN_HOLDOUT",
    "MIN_STEPS",
    "MIN_WHITENED_STEPS",
    "OBJECTIVES",
    "RISING",
    "RISING_Z",
    "SCORES",
    "UPSAMPLED",
    "ActivationCache",
    "BestEpoch",
    "LossFn",
    "Objective",
    "Plan",
    "Preconditioner",
    "Recipe",
    "StepLosses",
    "Task",
    "TrainResult",
    "cross_entropy",
    "evaluate",
    "evaluate_stitches",
    "fit_least_squares_all",
    "holdout_size",
    "holdout_split",
    "kl_to",
    "logits_of",
    "optimise",
    "score_stitches",
    "stitching_penalty",
    "task_of",
    "total_steps",
    "train_stitch",
    "train_stitches",
]
