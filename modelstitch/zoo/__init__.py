"""The paper's model zoo: small CIFAR-style ResNets, their training and files.

Hernandez et al. stitch 16 small ResNets, ``R1111`` to ``R2222``: the four
digits are the number of residual blocks in each of the four stages, so
``R2222`` is ResNet18 laid out for 32x32 inputs. This module builds them
(`small_resnet`), names their stitchable layers (`layer_names`), makes
random-weight controls (`random_control`), trains and evaluates them as
classifiers (`train_classifier`, `evaluate_classifier`) and saves and loads them
as ``.safetensors`` files (`save_model`, `load_model`). For studies over
language models it builds small GPT-2s over bytes (`tiny_gpt2`, trained by
`train_classifier` with `LM_RECIPE`) and names any HuggingFace model's
blocks (`block_names`).

Examples:
    >>> model = small_resnet("R1211", width=16)
    >>> model.architecture, layer_names(model)[:3]
    ('R1211', ['stem', 'layer1.0', 'layer2.0'])
"""

from ._classifier import CLASSIFIER_RECIPE, evaluate_classifier, train_classifier
from ._files import load_model, save_model
from ._lm import LM_RECIPE, block_names, load_language_model, save_language_model, tiny_gpt2
from ._resnet import (
    ARCHITECTURES,
    Blocks,
    SmallResNet,
    architecture_name,
    layer_names,
    parse_blocks,
    random_control,
    small_resnet,
)

__all__ = [
    "ARCHITECTURES",
    "CLASSIFIER_RECIPE",
    "LM_RECIPE",
    "Blocks",
    "SmallResNet",
    "architecture_name",
    "block_names",
    "evaluate_classifier",
    "layer_names",
    "load_language_model",
    "load_model",
    "parse_blocks",
    "random_control",
    "save_language_model",
    "save_model",
    "small_resnet",
    "tiny_gpt2",
    "train_classifier",
]
