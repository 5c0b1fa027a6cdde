"""Small CIFAR-style ResNets ``R1111`` ... ``R2222``, their layer names and random controls."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Sequence

import torch
from torch import nn

from .._errors import StitchError

__all__ = [
    "ARCHITECTURES",
    "Blocks",
    "SmallResNet",
    "architecture_name",
    "layer_names",
    "parse_blocks",
    "random_control",
    "small_resnet",
]

Blocks = str | Sequence[int]

ARCHITECTURES: tuple[str, ...] = tuple("R" + "".join(d) for d in itertools.product("12", repeat=4))
"""The 16 architectures of the paper, ``"R1111"``, ``"R1112"``, ..., ``"R2222"``."""

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
        from torchvision.models.resnet import BasicBlock  # torchvision loads only when a network is built

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
            ... `nn.Sequential` stages); a HuggingFace transformer (its
            blocks, see `block_names`); or a block layout such as ``"R1211"``
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
        from ._lm import block_names

        with contextlib.suppress(StitchError):
            return block_names(model)  # a HuggingFace transformer: its blocks
        raise StitchError(
            f"layer_names: {type(model).__name__} is not a ResNet this function knows: it expects a top-level "
            "'stem', 'relu' or 'act1' module and nn.Sequential stages 'layer1', 'layer2', ...; "
            "or a HuggingFace transformer's blocks; name the layers to stitch yourself (see model.named_modules())"
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
