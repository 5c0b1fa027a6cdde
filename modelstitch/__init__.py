"""modelstitch: measure how interchangeable two networks' representations are.

Take a frozen *sender* up to one layer, pass its output through a small
trainable *stitch*, feed the result into a frozen *receiver* in place of one
of its layers, train only the stitch, and read the stitched network's
accuracy.

Examples:
    >>> import torch, torchvision, modelstitch as ms
    >>> a = torchvision.models.resnet18(num_classes=10)
    >>> b = torchvision.models.resnet18(num_classes=10)
    >>> stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    >>> stitched(torch.randn(4, 3, 32, 32)).shape
    torch.Size([4, 10])
"""

from . import data, zoo
from ._cache import ActivationCache
from ._capture import Activations, activations, capture, layer_specs, list_layers, select_output
from ._checkpoint import load_checkpoint, save_checkpoint
from ._device import resolve_device
from ._errors import StitchError
from ._lstsq import LeastSquares, fit_least_squares
from ._presets import PRESETS, run_preset
from ._recipe import Recipe
from ._spec import ActivationSpec
from ._split import Prefix, Suffix, prefix, suffix
from ._stitched import StitchedModel, stitch
from ._stitches import STITCH_KINDS, Stitch, make_stitch
from ._store import ResultStore
from ._study import Cell, Study, StudyResults
from ._train import TrainResult, evaluate, evaluate_stitches, stitching_penalty, train_stitch, train_stitches
from ._version import __version__

__all__ = [
    "PRESETS",
    "Cell",
    "ResultStore",
    "Study",
    "StudyResults",
    "run_preset",
    "ActivationCache",
    "LeastSquares",
    "TrainResult",
    "evaluate",
    "evaluate_stitches",
    "fit_least_squares",
    "stitching_penalty",
    "train_stitch",
    "train_stitches",
    "STITCH_KINDS",
    "ActivationSpec",
    "Activations",
    "Prefix",
    "Recipe",
    "Stitch",
    "StitchError",
    "StitchedModel",
    "Suffix",
    "__version__",
    "activations",
    "capture",
    "data",
    "layer_specs",
    "list_layers",
    "load_checkpoint",
    "make_stitch",
    "prefix",
    "resolve_device",
    "save_checkpoint",
    "select_output",
    "stitch",
    "suffix",
    "zoo",
]
