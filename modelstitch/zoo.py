"""The paper's model zoo: small CIFAR-style ResNets, their training and files.

Hernandez et al. stitch 16 small ResNets, ``R1111`` to ``R2222``: the four
digits are the number of residual blocks in each of the four stages, so
``R2222`` is ResNet18 laid out for 32x32 inputs. This module builds them
(`small_resnet`), names their stitchable layers (`layer_names`), makes
random-weight controls (`random_control`), trains and evaluates them as
classifiers (`train_classifier`, `evaluate_classifier`) and saves and loads them
as ``.safetensors`` files (`save_model`, `load_model`).

Examples:
    >>> model = small_resnet("R1211", width=16)
    >>> model.architecture, layer_names(model)[:3]
    ('R1211', ['stem', 'layer1.0', 'layer2.0'])
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import BasicBlock
from tqdm.auto import tqdm

from ._batches import as_loader, iterate_batches
from ._checkpoint import load_checkpoint, save_checkpoint
from ._device import resolve_device
from ._errors import StitchError
from ._recipe import Recipe
from ._train import evaluate

__all__ = [
    "ARCHITECTURES",
    "CLASSIFIER_RECIPE",
    "SmallResNet",
    "architecture_name",
    "evaluate_classifier",
    "layer_names",
    "load_model",
    "parse_blocks",
    "random_control",
    "save_model",
    "small_resnet",
    "train_classifier",
]

Blocks = str | Sequence[int]

ARCHITECTURES: tuple[str, ...] = tuple("R" + "".join(d) for d in itertools.product("12", repeat=4))
"""The 16 architectures of the paper, ``"R1111"``, ``"R1112"``, ..., ``"R2222"``."""

CLASSIFIER_RECIPE = Recipe(
    lr=0.1,
    base_batch_size=128,
    batch_size=128,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    epochs=30,
    warmup=0.05,
    amp=True,
    channels_last=True,
)
"""Recipe for training a zoo model from scratch on CIFAR-10.

SGD with Nesterov momentum 0.9, learning rate 0.1 at batch size 128, weight
decay 5e-4, 30 epochs, 5% linear warmup then cosine decay, bfloat16 autocast
and channels-last on CUDA. With random-crop and flip augmentation
(``modelstitch.data.cifar10(..., augment=True)``) this is the standard recipe
that takes CIFAR ResNets past 90% test accuracy.
"""

_BLOCKS_HELP = (
    "use a name such as 'R1211' (the letter R and one digit 1-9 per stage, four stages) "
    "or a tuple of four positive ints such as (2, 2, 2, 2) (ResNet18) or (3, 4, 6, 3) (ResNet34)"
)
_NAME_RE = re.compile(r"R([1-9])([1-9])([1-9])([1-9])")
_LONG_NAME_RE = re.compile(r"R(\d+)-(\d+)-(\d+)-(\d+)")


def parse_blocks(blocks: Blocks) -> tuple[int, int, int, int]:
    """Blocks per stage from an architecture name or a tuple.

    Args:
        blocks: ``"R1211"`` (one digit 1-9 per stage), ``"R3-4-23-3"`` (the
            form `architecture_name` gives when a stage has 10 or more blocks),
            or four positive ints.

    Returns:
        A tuple of four positive ints.

    Raises:
        StitchError: ``blocks`` is neither; the message shows valid input.

    Examples:
        >>> parse_blocks("R1211"), parse_blocks([3, 4, 6, 3])
        ((1, 2, 1, 1), (3, 4, 6, 3))
    """
    if isinstance(blocks, str):
        match = _NAME_RE.fullmatch(blocks.strip()) or _LONG_NAME_RE.fullmatch(blocks.strip())
        if match is None:
            raise StitchError(f"blocks={blocks!r} is not an architecture name: {_BLOCKS_HELP}")
        counts = tuple(int(g) for g in match.groups())
        if min(counts) < 1:
            raise StitchError(f"blocks={blocks!r}: every stage needs at least one block; {_BLOCKS_HELP}")
        return counts  # type: ignore[return-value]
    if isinstance(blocks, Sequence) and len(blocks) == 4:
        ok = all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)
        if ok:
            return tuple(int(b) for b in blocks)  # type: ignore[return-value]
    raise StitchError(f"blocks={blocks!r} is not a valid block layout: {_BLOCKS_HELP}")


def architecture_name(blocks: Blocks) -> str:
    """The canonical name of a block layout.

    Examples:
        >>> architecture_name((1, 2, 1, 1)), architecture_name("R2222"), architecture_name((3, 4, 23, 3))
        ('R1211', 'R2222', 'R3-4-23-3')
    """
    counts = parse_blocks(blocks)
    if max(counts) <= 9:
        return "R" + "".join(str(c) for c in counts)
    return "R" + "-".join(str(c) for c in counts)


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StitchError(f"{what} must be a positive int, got {value!r}")
    return value


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet built from torchvision's `BasicBlock` (the paper's zoo).

    Modules in forward order, with output shapes for input ``[B, 3, 32, 32]``
    and ``width=w``:

    - ``stem``: 3x3 conv (stride 1, no bias), BatchNorm, ReLU -> ``[B, w, 32, 32]``
    - ``layer1.0`` ... : ``blocks[0]`` BasicBlocks, stride 1 -> ``[B, w, 32, 32]``
    - ``layer2.0`` ... : ``blocks[1]`` BasicBlocks, the first with stride 2 -> ``[B, 2w, 16, 16]``
    - ``layer3.0`` ... : ``blocks[2]`` BasicBlocks, the first with stride 2 -> ``[B, 4w, 8, 8]``
    - ``layer4.0`` ... : ``blocks[3]`` BasicBlocks, the first with stride 2 -> ``[B, 8w, 4, 4]``
    - ``avgpool`` (global average pool) -> ``[B, 8w, 1, 1]``; ``flatten`` -> ``[B, 8w]``
    - ``fc``: linear classifier -> ``[B, num_classes]``

    A block whose input and output shapes differ gets torchvision's shortcut:
    a 1x1 stride-2 conv and BatchNorm. Weights use torchvision's He
    initialisation. There is no max-pool. Build one with `small_resnet`.

    Attributes:
        blocks: blocks per stage, e.g. ``(1, 2, 1, 1)``.
        width: channels of the stem and stage 1.
        num_classes: outputs of ``fc``.
    """

    def __init__(self, blocks: Blocks, *, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.blocks: tuple[int, int, int, int] = parse_blocks(blocks)
        self.width: int = _check_positive_int(width, "width")
        self.num_classes: int = _check_positive_int(num_classes, "num_classes")
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        in_channels = width
        for stage, count in enumerate(self.blocks):
            channels = width * 2**stage
            stride = 1 if stage == 0 else 2
            layers = []
            for i in range(count):
                block_stride = stride if i == 0 else 1
                downsample = None
                if block_stride != 1 or in_channels != channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, channels, kernel_size=1, stride=block_stride, bias=False),
                        nn.BatchNorm2d(channels),
                    )
                layers.append(BasicBlock(in_channels, channels, stride=block_stride, downsample=downsample))
                in_channels = channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    @property
    def architecture(self) -> str:
        """The layout's name, e.g. ``"R1211"`` (see `architecture_name`)."""
        return architecture_name(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]`` (32x32 for CIFAR-10)."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.fc(self.flatten(self.avgpool(x)))

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, width={self.width}, num_classes={self.num_classes}"


def small_resnet(blocks: Blocks, *, num_classes: int = 10, width: int = 64) -> SmallResNet:
    """Build one of the paper's small ResNets (random He-initialised weights).

    Uses the global torch RNG for the initial weights, like any torch model;
    see `random_control` for weights drawn from a seed.

    Args:
        blocks: blocks per stage: a name such as ``"R1211"`` or a tuple such as
            ``(2, 2, 2, 2)`` (ResNet18) or ``(3, 4, 6, 3)`` (ResNet34).
        num_classes: outputs of the final linear layer.
        width: channels of stage 1; stages 2-4 have ``2w``, ``4w``, ``8w``.

    Returns:
        A `SmallResNet` in training mode, mapping ``[B, 3, 32, 32]`` images to
        ``[B, num_classes]`` logits.

    Raises:
        StitchError: ``blocks``, ``width`` or ``num_classes`` is invalid.

    Examples:
        >>> model = small_resnet("R2222", width=8)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return SmallResNet(blocks, num_classes=num_classes, width=width)


def _stage_names(model: nn.Module) -> list[str]:
    children = dict(model.named_children())
    names = []
    stage = 1
    while isinstance(children.get(f"layer{stage}"), nn.Sequential):
        names += [f"layer{stage}.{i}" for i in range(len(children[f"layer{stage}"]))]
        stage += 1
    return names


def layer_names(model_or_blocks: nn.Module | Blocks) -> list[str]:
    """The paper's layer indices as module names: the places a stitch can go.

    Index 0 is the stem's output (first conv + BN + ReLU); indices ``1..N``
    are the residual blocks in forward order. For a `SmallResNet` or a block
    layout, that is ``["stem", "layer1.0", ..., "layer4.<last>"]``, with
    ``1 + sum(blocks)`` entries.

    Torchvision ResNets (``resnet18``, ``resnet34``, ``resnet50``, ...) work
    too. Their stem is conv1, bn1, relu, maxpool; index 0 is ``"relu"`` (the
    top-level ReLU, which runs once per forward), i.e. the representation
    *before* the 3x3 max-pool, matching "output of the first conv+bn+relu".
    timm ResNets name that module ``"act1"``, which is used in the same way.

    Args:
        model_or_blocks: a `SmallResNet`; a torchvision- or timm-style ResNet
            (a top-level ``relu``/``act1`` module and ``layer1``, ``layer2``,
            ... `nn.Sequential` stages); or a block layout such as ``"R1211"``
            or ``(2, 2, 2, 2)``.

    Returns:
        Module names, usable with ``dict(model.named_modules())``.

    Raises:
        StitchError: the model has no recognisable stem or stages, or the
            block layout is invalid.

    Examples:
        >>> layer_names("R1211")
        ['stem', 'layer1.0', 'layer2.0', 'layer2.1', 'layer3.0', 'layer4.0']
    """
    if not isinstance(model_or_blocks, nn.Module):
        counts = parse_blocks(model_or_blocks)
        return ["stem"] + [f"layer{s + 1}.{i}" for s, count in enumerate(counts) for i in range(count)]
    model = model_or_blocks
    children = dict(model.named_children())
    stem = next((name for name in ("stem", "relu", "act1") if name in children), None)
    stages = _stage_names(model)
    if stem is None or not stages:
        raise StitchError(
            f"layer_names: {type(model).__name__} is not a ResNet this function knows: it expects a top-level "
            "'stem', 'relu' or 'act1' module and nn.Sequential stages 'layer1', 'layer2', ...; "
            "name the layers to stitch yourself (see model.named_modules())"
        )
    return [stem, *stages]


def random_control(blocks: Blocks, *, seed: int, num_classes: int = 10, width: int = 64) -> SmallResNet:
    """The same architecture with random (untrained) weights drawn from ``seed``.

    The paper's control: stitching into a random network shows how much of a
    stitch's accuracy comes from the stitch itself. The same seed gives
    bitwise the same weights; the global torch RNG state is left as it was.

    Args:
        blocks: block layout, as for `small_resnet`.
        seed: seeds the initial weights.
        num_classes: outputs of ``fc``.
        width: channels of stage 1.

    Returns:
        A `SmallResNet` in eval mode (a frozen control network).

    Examples:
        >>> a, b = random_control("R1111", seed=3, width=8), random_control("R1111", seed=3, width=8)
        >>> torch.equal(a.fc.weight, b.fc.weight)
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StitchError(f"random_control: seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = small_resnet(blocks, num_classes=num_classes, width=width)
    return model.eval()


# --------------------------------------------------------------------------- training


def train_classifier(
    model: nn.Module,
    train_data: Dataset[Any] | DataLoader[Any],
    *,
    recipe: Recipe = CLASSIFIER_RECIPE,
    test_data: Dataset[Any] | DataLoader[Any] | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train ``model`` as a classifier with cross entropy (in place).

    Uses ``recipe.optimizer`` over the trainable parameters and steps
    ``recipe.scheduler`` once per batch. On CUDA with ``recipe.amp`` the
    forward runs under `torch.autocast` with ``recipe.amp_dtype`` (float16 also
    gets a gradient scaler); on the CPU it runs in float32. Gradients are
    clipped to ``recipe.grad_clip`` when set.

    Given a Dataset, batches of ``recipe.batch_size`` are drawn in an order
    seeded by ``recipe.seed`` (the last incomplete batch of each epoch is
    dropped). Given a DataLoader, it is used as it is (its own order) and the
    learning rate is scaled to its ``batch_size``. The global torch RNG is
    seeded with ``recipe.seed`` for the run (so random augmentation in the
    main process repeats too) and restored afterwards.

    Args:
        model: maps ``[B, ...]`` inputs to ``[B, num_classes]`` logits. It is
            moved to ``device`` and stays there; with ``recipe.channels_last``
            it is also converted to channels-last.
        train_data: Dataset or DataLoader yielding ``(inputs, labels)`` with
            int64 labels ``[B]``.
        recipe: optimiser, schedule, epochs (may be fractional), numerics and
            seed; defaults to `CLASSIFIER_RECIPE`.
        test_data: if given, evaluated once after training.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        progress: show a tqdm progress bar.
        num_workers: DataLoader worker processes when ``train_data`` or
            ``test_data`` is a Dataset.

    Returns:
        ``{"train_loss": mean loss over the last epoch, "test_accuracy":
        float in [0, 1] or None, "epochs": recipe.epochs, "steps": optimiser
        steps taken}``.

    Raises:
        StitchError: bad data, or the loss became NaN or infinite (the message
            names the step).

    The model is left in eval mode, also when training fails.
    """
    if not isinstance(recipe, Recipe):
        raise StitchError(f"train_classifier: recipe must be a modelstitch Recipe, got {type(recipe).__name__}")
    dev = resolve_device(device)
    train_loader = as_loader(
        train_data,
        what="train_data",
        batch_size=recipe.batch_size,
        shuffle=True,
        seed=recipe.seed,
        num_workers=num_workers,
        drop_last=True,
    )
    if isinstance(train_data, DataLoader) and train_loader.batch_size and train_loader.batch_size != recipe.batch_size:
        recipe = recipe.replace(batch_size=train_loader.batch_size)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, math.ceil(recipe.epochs * steps_per_epoch))

    model.to(dev)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    use_amp = recipe.amp and dev.type == "cuda"
    amp_dtype = getattr(torch, recipe.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StitchError("train_classifier: the model has no trainable parameters")
    optimizer = recipe.optimizer(params)
    scheduler = recipe.scheduler(optimizer, total_steps)
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

    step = 0
    epoch = 0
    last_epoch_loss = math.nan
    try:
        with (
            torch.random.fork_rng(devices=rng_devices),
            tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True) as bar,
        ):
            torch.manual_seed(recipe.seed)
            model.train()
            while step < total_steps:
                loss_sum, count = 0.0, 0
                for x, y in iterate_batches(train_loader, dev, channels_last=recipe.channels_last):
                    if y is None:
                        raise StitchError("train_data must yield (inputs, labels) pairs; it yields inputs only")
                    if step >= total_steps:
                        break
                    with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise StitchError(
                            f"train_classifier: the loss became {value} at step {step + 1} of {total_steps} "
                            f"(epoch {epoch + 1}); lower recipe.lr, set recipe.grad_clip, or check the data"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if recipe.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    loss_sum += value
                    count += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", refresh=False)
                epoch += 1
                last_epoch_loss = loss_sum / max(count, 1)
    finally:
        model.eval()

    test_accuracy = None
    if test_data is not None:
        test_accuracy = evaluate_classifier(
            model, test_data, device=dev, batch_size=max(recipe.batch_size, 256), num_workers=num_workers
        )["accuracy"]
    return {"train_loss": last_epoch_loss, "test_accuracy": test_accuracy, "epochs": recipe.epochs, "steps": step}


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    data: Dataset[Any] | DataLoader[Any],
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross entropy of a classifier, in float32.

    The model runs in eval mode; its previous mode is restored afterwards.
    It is moved to ``device`` and stays there.

    Args:
        model: maps ``[B, ...]`` inputs to ``[B, num_classes]`` logits.
        data: Dataset or DataLoader yielding ``(inputs, labels)``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        batch_size: batch size when ``data`` is a Dataset.
        num_workers: DataLoader workers when ``data`` is a Dataset.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": mean cross entropy}``.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
        >>> sorted(evaluate_classifier(small_resnet("R1111", width=4), data, device="cpu"))
        ['accuracy', 'loss']
    """
    return evaluate(
        model, data, device=device, batch_size=_check_positive_int(batch_size, "batch_size"), num_workers=num_workers
    )


# --------------------------------------------------------------------------- files


def save_model(
    path: str | os.PathLike[str],
    model: SmallResNet,
    *,
    dataset: str,
    test_accuracy: float | None = None,
    seed: int | None = None,
) -> Path:
    """Save a zoo model as a ``.safetensors`` checkpoint with its metadata.

    The metadata records ``architecture`` (e.g. ``"R1211"``), ``blocks``,
    ``width``, ``num_classes``, ``dataset``, ``test_accuracy``, ``seed`` and
    ``library_version``; `load_model` rebuilds the model from it.

    Args:
        path: the file to write (atomically), conventionally ``*.safetensors``.
        model: a `SmallResNet`.
        dataset: what it was trained on, e.g. ``"cifar10"``.
        test_accuracy: its test accuracy in [0, 1], if measured.
        seed: the training seed, if any.

    Returns:
        ``path`` as a `pathlib.Path`.

    Raises:
        StitchError: ``model`` is not a `SmallResNet`.
    """
    if not isinstance(model, SmallResNet):
        raise StitchError(
            f"save_model saves SmallResNets (from modelstitch.zoo.small_resnet), got {type(model).__name__}; "
            "use modelstitch's save_checkpoint for other models"
        )
    metadata = {
        "architecture": model.architecture,
        "blocks": list(model.blocks),
        "width": model.width,
        "num_classes": model.num_classes,
        "dataset": str(dataset),
        "test_accuracy": None if test_accuracy is None else float(test_accuracy),
        "seed": seed,
    }
    return save_checkpoint(path, model, metadata)


def load_model(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    expected_architecture: Blocks | None = None,
) -> SmallResNet:
    """Load a zoo model saved by `save_model`.

    Never unpickles: the file is read with safetensors only.

    Args:
        path: a checkpoint written by `save_model`.
        map_location: the device to put the model on.
        expected_architecture: if given (``"R2222"`` or ``(2, 2, 2, 2)``), the
            file must hold that architecture.

    Returns:
        The `SmallResNet`, in eval mode. Its ``checkpoint_metadata`` attribute
        holds the file's metadata (``dataset``, ``test_accuracy``, ...).

    Raises:
        StitchError: the file is missing or not a zoo checkpoint, its metadata
            and weights disagree, or it is not ``expected_architecture``.
    """
    state, metadata = load_checkpoint(path)
    where = str(path)
    missing = [k for k in ("architecture", "blocks", "width", "num_classes") if k not in metadata]
    if missing:
        raise StitchError(f"{where!r} is not a zoo model checkpoint: its metadata lacks {missing}")
    try:
        blocks = parse_blocks(tuple(metadata["blocks"]))
        model = small_resnet(blocks, num_classes=metadata["num_classes"], width=metadata["width"])
    except (StitchError, TypeError) as err:
        raise StitchError(f"{where!r} has invalid zoo metadata: {err}") from None
    if metadata["architecture"] != model.architecture:
        raise StitchError(
            f"{where!r} says architecture {metadata['architecture']!r} but its blocks {list(blocks)} "
            f"build {model.architecture!r}"
        )
    if expected_architecture is not None:
        expected = architecture_name(expected_architecture)
        if expected != model.architecture:
            raise StitchError(f"{where!r} holds a {model.architecture} model, but {expected} was expected")
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise StitchError(
            f"{where!r}: weight {k!r} has shape {tuple(state[k].shape)} but a {model.architecture} of width "
            f"{model.width} with {model.num_classes} classes needs {tuple(own[k].shape)}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StitchError(
            f"{where!r}: weights do not match a {model.architecture} (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.checkpoint_metadata = metadata
    return model.to(map_location).eval()
