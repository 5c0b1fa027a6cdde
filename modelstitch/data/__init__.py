"""Datasets for the zoo: CIFAR-10 (download or image folder) and offline digits.

Every dataset here yields ``(image, label)`` with ``image`` a float32
``[3, H, W]`` tensor (normalised unless ``normalize=False``) and ``label`` an
int. `digits` needs no download at all (scikit-learn ships the images), which
makes it the dataset for quick checks and tests. For language models,
`TokenSequences`, `pack_text`, `text_splits` and `pydoc_corpus` give token
sequences (byte-level by default) from a text that ships with Python.

Examples:
    >>> train, test = digits(train=True), digits(train=False)
    >>> image, label = train[0]
    >>> len(train), len(test), tuple(image.shape)
    (1437, 360, (3, 32, 32))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .._errors import StitchError
from ..core import loader
from ._tensor_images import TensorImages, decoded_image_folder
from ._text import (
    BYTE_VOCAB,
    IGNORE_INDEX,
    TokenSequences,
    byte_tokens,
    decode_bytes,
    pack_text,
    pydoc_corpus,
    text_splits,
)

if TYPE_CHECKING:  # torchvision loads when a dataset is made, not on import
    from torchvision import datasets, transforms

__all__ = [
    "BYTE_VOCAB",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_CLASSES",
    "IGNORE_INDEX",
    "TensorImages",
    "TokenSequences",
    "byte_tokens",
    "cifar10",
    "cifar10_folder",
    "decode_bytes",
    "decoded_image_folder",
    "denormalize",
    "digits",
    "image_folder",
    "image_transform",
    "loader",
    "pack_text",
    "pydoc_corpus",
    "subset",
    "text_splits",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images (RGB, in [0, 1])."""

CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images (RGB)."""

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""CIFAR-10 class names in label order (also alphabetical, so ImageFolder agrees)."""

DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""Class names of `digits`: ``"0"`` ... ``"9"``; label ``i`` is digit ``i``."""


def image_transform(
    *,
    augment: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    image_size: int | None = None,
) -> transforms.Compose:
    """The transform from a PIL image to a ``[3, H, W]`` float tensor.

    Args:
        augment: add the standard CIFAR augmentation, a random crop of size
            ``image_size`` (32 when ``None``) with ``size // 8`` pixels of
            padding (4 for 32x32) and a random horizontal flip.
        normalize: subtract ``mean`` and divide by ``std`` per channel;
            otherwise values stay in [0, 1].
        mean: per-channel mean (RGB).
        std: per-channel standard deviation (RGB).
        image_size: resize every image to ``image_size`` x ``image_size``
            first; ``None`` keeps the size (so with ``augment`` the images are
            assumed to be 32x32).

    Returns:
        A torchvision `Compose`.

    Examples:
        >>> image_transform(augment=True)
        Compose(
            RandomCrop(size=(32, 32), padding=4)
            RandomHorizontalFlip(p=0.5)
            ToTensor()
            Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
        )
    """
    from torchvision import transforms

    steps: list[Any] = []
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise StitchError(f"image_size must be a positive int or None, got {image_size!r}")
        steps.append(transforms.Resize((image_size, image_size), antialias=True))
    if augment:
        size = image_size or 32
        steps += [transforms.RandomCrop(size, padding=max(1, size // 8)), transforms.RandomHorizontalFlip()]
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize(tuple(mean), tuple(std)))
    return transforms.Compose(steps)


def cifar10(
    root: str | os.PathLike[str],
    *,
    train: bool = True,
    download: bool = False,
    augment: bool = False,
    normalize: bool = True,
) -> Dataset[tuple[torch.Tensor, int]]:
    """CIFAR-10 through `torchvision.datasets.CIFAR10`.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py``.
        train: the 50,000 training images, or else the 10,000 test images.
        download: download the dataset (about 170 MB) if it is missing.
        augment: random crop (padding 4) and horizontal flip, for training.
        normalize: normalise with `CIFAR10_MEAN` and `CIFAR10_STD`.

    Returns:
        A dataset of ``(image [3, 32, 32] float32, label int)``.

    Raises:
        StitchError: the data is not under ``root`` and ``download`` is
            False, or the download failed.
    """
    from torchvision import datasets

    root = Path(root).expanduser()
    transform = image_transform(augment=augment, normalize=normalize)
    try:
        return datasets.CIFAR10(str(root), train=train, download=download, transform=transform)
    except RuntimeError:
        if download:
            raise StitchError(
                f"CIFAR-10 under {str(root)!r} is corrupted: delete {str(root / 'cifar-10-batches-py')!r} "
                "and download again"
            ) from None
        raise StitchError(
            f"CIFAR-10 was not found under {str(root)!r} (looked for {str(root / 'cifar-10-batches-py')!r}); "
            "pass download=True to download it, or, for a copy stored as image files, use cifar10_folder()"
        ) from None
    except OSError as err:
        raise StitchError(f"could not download CIFAR-10 into {str(root)!r}: {err}") from None


def image_folder(
    root: str | os.PathLike[str],
    *,
    augment: bool = False,
    normalize: bool = True,
    image_size: int | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> datasets.ImageFolder:
    """Images stored as ``<root>/<class>/<image>`` through `torchvision.datasets.ImageFolder`.

    Labels are the class folders in alphabetical order (``dataset.classes``).

    Args:
        root: the folder whose subfolders are the classes.
        augment: random crop and flip (see `image_transform`).
        normalize: normalise with ``mean`` and ``std``.
        image_size: resize to ``image_size`` x ``image_size``; ``None`` keeps
            the stored size.
        mean: per-channel mean; CIFAR-10's by default.
        std: per-channel standard deviation; CIFAR-10's by default.

    Returns:
        An ImageFolder of ``(image [3, H, W] float32, label int)``.

    Raises:
        StitchError: ``root`` is missing or holds no class folders with images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StitchError(f"image folder {str(root)!r} does not exist")
    from torchvision import datasets

    transform = image_transform(augment=augment, normalize=normalize, mean=mean, std=std, image_size=image_size)
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise StitchError(
            f"image folder {str(root)!r} has no images in the <root>/<class>/<image> layout ({err})"
        ) from None


def cifar10_folder(
    root: str | os.PathLike[str],
    *,
    train: bool = True,
    augment: bool = False,
    normalize: bool = True,
    decoded: bool = False,
) -> datasets.ImageFolder | TensorImages:
    """CIFAR-10 stored as image files: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``.

    The class folders must be the ten CIFAR-10 class names (`CIFAR10_CLASSES`);
    their alphabetical order is CIFAR-10's label order, so labels agree with
    `cifar10`.

    Args:
        root: the folder holding ``train`` and ``test``.
        train: read ``root/train``, or else ``root/test``.
        augment: random crop (padding 4) and horizontal flip, for training.
        normalize: normalise with `CIFAR10_MEAN` and `CIFAR10_STD`.
        decoded: decode every image once into a `TensorImages` (cached on
            disk, see `decoded_image_folder`): the whole split as one uint8
            tensor, batched and augmented with tensor operations, on the GPU
            after ``.to("cuda")``.

    Returns:
        An ImageFolder (or, with ``decoded``, a `TensorImages`) of
        ``(image [3, 32, 32] float32, label int)``.

    Raises:
        StitchError: the folder is missing or its classes are not CIFAR-10's.
    """
    split = Path(root).expanduser() / ("train" if train else "test")
    if not split.is_dir():
        raise StitchError(
            f"CIFAR-10 image folder {str(split)!r} does not exist; expected <root>/train/<class>/*.jpg "
            "and <root>/test/<class>/*.jpg"
        )
    if decoded:
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if normalize else ((0.0,) * 3, (1.0,) * 3)
        dataset = decoded_image_folder(split, mean=mean, std=std, augment=augment)
    else:
        dataset = image_folder(split, augment=augment, normalize=normalize)
    if tuple(dataset.classes) != CIFAR10_CLASSES:
        raise StitchError(f"{str(split)!r} has classes {dataset.classes}, not CIFAR-10's {list(CIFAR10_CLASSES)}")
    return dataset


def digits(*, train: bool = True, normalize: bool = True, seed: int = 0, image_size: int = 32) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits as a small offline RGB image dataset.

    The 1,797 images (values 0-16) are scaled to [0, 1], resized to
    ``image_size x image_size`` (bilinear; 32x32 by default) and repeated to three channels. A stratified split with
    ``seed`` puts 80% (1,437) in train and 20% (360) in test. With
    ``normalize`` both splits are normalised with the train split's
    per-channel mean and standard deviation. No download is needed.

    Args:
        train: return the train split, or else the test split.
        normalize: normalise (see above); otherwise values are in [0, 1].
        seed: seeds the split; the same seed always gives the same split.
        image_size: height and width of the images (at least 8, their own
            resolution; the quick preset uses 32).

    Returns:
        A `TensorDataset` of float32 images ``[N, 3, image_size, image_size]`` and int64
        labels ``[N]``; its ``classes`` attribute is `DIGITS_CLASSES` and its
        ``mean``/``std`` attributes are the per-channel statistics used (for
        `denormalize`; zeros and ones when ``normalize=False``).

    Examples:
        >>> x, y = digits(train=False)[0]
        >>> x.dtype, x.shape, y.dtype
        (torch.float32, torch.Size([3, 32, 32]), torch.int64)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise StitchError(f"digits: image_size is the images' side, an int >= 8 (they are 8x8), got {image_size!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # [1797, 8, 8], in [0, 1]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    images = F.interpolate(images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()  # [1797, 3, image_size, image_size]

    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )
    train_idx, test_idx = torch.as_tensor(sorted(train_idx)), torch.as_tensor(sorted(test_idx))
    if normalize:
        mean = images[train_idx].mean(dim=(0, 2, 3))
        std = images[train_idx].std(dim=(0, 2, 3))
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    idx = train_idx if train else test_idx
    x = ((images[idx] - mean[:, None, None]) / std[:, None, None]).contiguous()
    dataset = TensorDataset(x, labels[idx].clone())
    dataset.classes = DIGITS_CLASSES  # type: ignore[attr-defined]
    dataset.mean = tuple(mean.tolist())  # type: ignore[attr-defined]
    dataset.std = tuple(std.tolist())  # type: ignore[attr-defined]
    return dataset


def subset(dataset: Dataset[Any], limit: int | None, *, seed: int = 0) -> Dataset[Any]:
    """The first ``limit`` samples of a fixed, seeded permutation of ``dataset``.

    Handy for quick runs (``--limit``): the same ``limit`` and ``seed`` give the
    same samples, and a larger ``limit`` extends a smaller one.

    Args:
        dataset: any map-style dataset.
        limit: how many samples to keep; ``None``, or at least
            ``len(dataset)``, returns ``dataset`` itself.
        seed: seeds the permutation.

    Returns:
        A `torch.utils.data.Subset`, or ``dataset``.

    Raises:
        StitchError: ``limit`` is not a positive int.

    Examples:
        >>> len(subset(digits(train=False), 10))
        10
    """
    if limit is None:
        return dataset
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StitchError(f"subset: limit must be a positive int or None, got {limit!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if limit >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if callable(getattr(dataset, "subset", None)):  # a TensorImages stays one
        return dataset.subset(order[:limit])
    return Subset(dataset, order[:limit].tolist())


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `Normalize` for display: ``x * std + mean``, clamped to [0, 1].

    Args:
        x: normalised images ``[B, C, H, W]`` or ``[C, H, W]``.
        mean: per-channel mean used to normalise (length ``C``).
        std: per-channel standard deviation used to normalise (length ``C``).

    Returns:
        Images in [0, 1], same shape as ``x``.

    Examples:
        >>> denormalize(torch.zeros(1, 3, 2, 2), CIFAR10_MEAN, CIFAR10_STD)[0, :, 0, 0]
        tensor([0.4914, 0.4822, 0.4465])
    """
    if x.dim() not in (3, 4):
        raise StitchError(f"denormalize expects [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise StitchError(f"denormalize: {channels} channels but mean has {len(mean)} and std {len(std)} values")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * s + m).clamp(0.0, 1.0)
