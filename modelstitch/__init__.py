"""modelstitch: measure how interchangeable two networks' representations are.

Take a frozen *sender* up to one layer, pass its output through a small
trainable *stitch*, feed the result into a frozen *receiver* in place of one
of its layers, train only the stitch, and read the stitched network's
accuracy.

The top level holds the names most users call, grouped by layer below; the
rest lives in the layer's subpackage (`modelstitch.core`, `.stitches`,
`.train`, `.study`, `.analysis`, `.metrics`, `.zoo`, `.data`). Names are
loaded on first use, so ``import modelstitch`` is cheap.

Examples:
    >>> import torch, torchvision, modelstitch as ms
    >>> a = torchvision.models.resnet18(num_classes=10)
    >>> b = torchvision.models.resnet18(num_classes=10)
    >>> stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    >>> stitched(torch.randn(4, 3, 32, 32)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import StitchError, StitchWarning
from ._version import __version__

if TYPE_CHECKING:  # what the lazy loader below provides, for type checkers and IDEs
    from . import analysis, core, data, metrics, stitches, study, train, zoo  # noqa: F401
    from .core import ActivationSpec, activations, capture, layer_specs, list_layers, prefix, suffix  # noqa: F401
    from .stitches import StitchedModel, fit_least_squares, make_stitch, stitch  # noqa: F401
    from .study import Study, StudyResults, run_preset  # noqa: F401
    from .train import Recipe, evaluate, stitching_penalty, train_stitch, train_stitches  # noqa: F401

_PUBLIC: dict[str, str] = {
    # layer 1, addressing and capture
    "ActivationSpec": "core",
    "activations": "core",
    "capture": "core",
    "layer_specs": "core",
    "list_layers": "core",
    "prefix": "core",
    "suffix": "core",
    # layer 2, stitches
    "StitchedModel": "stitches",
    "fit_least_squares": "stitches",
    "make_stitch": "stitches",
    "stitch": "stitches",
    # layer 3, training
    "Recipe": "train",
    "evaluate": "train",
    "stitching_penalty": "train",
    "train_stitch": "train",
    "train_stitches": "train",
    # layer 5, studies
    "Study": "study",
    "StudyResults": "study",
    "run_preset": "study",
}

_SUBPACKAGES = ("analysis", "core", "data", "metrics", "stitches", "study", "train", "zoo")

# Names that were top-level before 0.2 (deprecated in 0.2 and 0.3, gone in 0.4): an AttributeError says where they went.
_MOVED: dict[str, str] = {
    "Activations": "core",
    "Prefix": "core",
    "Suffix": "core",
    "resolve_device": "core",
    "select_output": "core",
    "load_checkpoint": "core",
    "save_checkpoint": "core",
    "STITCH_KINDS": "stitches",
    "Stitch": "stitches",
    "LeastSquares": "stitches",
    "ActivationCache": "train",
    "TrainResult": "train",
    "evaluate_stitches": "train",
    "PRESETS": "study",
    "Cell": "study",
    "ResultStore": "study",
}

# The subpackages (`ms.core`, `ms.study`, ...) load on first use too; they are modules, not names in __all__.
__all__ = ["StitchError", "StitchWarning", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _MOVED:
        where = f"modelstitch.{_MOVED[name]}.{name}"
        raise AttributeError(f"modelstitch.{name} moved to {where} in 0.2 (the top-level name went in 0.4)")
    else:
        raise AttributeError(f"module 'modelstitch' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
