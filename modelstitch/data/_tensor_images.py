"""`TensorImages`: a whole image dataset as one uint8 tensor, decoded once, batched and augmented on its device."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._errors import StitchError
from ..core import atomic_path

__all__ = ["TensorImages", "decoded_image_folder"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


class TensorImages(Dataset):
    """Images ``[N, C, H, W]`` (uint8) and labels ``[N]`` held as two tensors, on any device.

    Indexing gives ``(image, label)`` like a torchvision dataset (float32,
    normalised, optionally augmented), so it works wherever a Dataset does.
    Training and evaluation use `loader` instead (the library does this by
    itself): whole batches are gathered, converted, normalised and augmented
    with tensor operations on the images' device, with no DataLoader worker
    and no per-image Python, which is what keeps a GPU busy on CIFAR-10.
    Move the images to the GPU once with ``.to("cuda")``.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        mean: per-channel mean in [0, 1] for normalisation.
        std: per-channel standard deviation.
        augment: random crop (``H // 8`` pixels of zero padding) and horizontal flip.
        classes: class names, in label order.

    Examples:
        >>> data = TensorImages(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10), mean=(0.5,) * 3,
        ...                     std=(0.5,) * 3)
        >>> x, y = data[3]
        >>> x.shape, float(x[0, 0, 0]), int(y)
        (torch.Size([3, 8, 8]), -1.0, 3)
        >>> [tuple(x.shape) for x, _ in data.loader(batch_size=4, shuffle=True, seed=0)]
        [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise StitchError(f"TensorImages needs uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise StitchError(f"TensorImages: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.augment = tuple(mean), tuple(std), augment
        self.classes = list(classes) if classes is not None else None
        self.transform = f"TensorImages(augment={augment}, mean={self.mean}, std={self.std})"  # for fingerprints

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._prepare(self.images[index : index + 1], None), self.labels[index]
        return x[0], y

    def to(self, device: str | torch.device) -> TensorImages:
        """A copy whose tensors live on ``device`` (batches are then made there)."""
        return TensorImages(
            self.images.to(device), self.labels.to(device), mean=self.mean, std=self.std, augment=self.augment,
            classes=self.classes,
        )  # fmt: skip

    def with_augment(self, augment: bool) -> TensorImages:
        """The same images (shared, not copied) with augmentation on or off."""
        return TensorImages(
            self.images, self.labels, mean=self.mean, std=self.std, augment=augment, classes=self.classes
        )

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TensorImages:
        """The images at ``indices``, as a `TensorImages` (so batches stay fast)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return TensorImages(
            self.images[index], self.labels[index], mean=self.mean, std=self.std, augment=self.augment,
            classes=self.classes,
        )  # fmt: skip

    def loader(self, *, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> _Batches:
        """An iterable of ``(images [B, C, H, W] float32, labels [B])`` batches made on the images' device."""
        return _Batches(self, batch_size, shuffle, seed, drop_last)

    def _prepare(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = images.float().div_(255)
        if self.augment:
            x = _augment(x, generator)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


class _Batches:
    """One `TensorImages.loader`: seeded order per epoch, whole-batch gathers on the images' device."""

    def __init__(self, data: TensorImages, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        self.dataset, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last and n > self.batch_size else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data, n = self.dataset, len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(data.images.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield data._prepare(data.images[index], self.generator), data.labels[index]


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with ``H // 8`` zero padding and a random horizontal flip, per image, on ``x``'s device."""
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def decoded_image_folder(
    root: str | os.PathLike[str],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TensorImages:
    """An image folder (``root/<class>/<image>``) decoded once into a `TensorImages`, cached on disk.

    The decoded images go to ``cache_dir`` (default ``$MODELSTITCH_CACHE_DIR``
    or ``~/.cache/modelstitch``), or beside the folder as
    ``<root>.uint8.safetensors`` when that is not writable. The cache records
    the folder's file names and sizes and is decoded again when they change,
    so each machine decodes a dataset once. All images must have one size.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(root).expanduser().resolve()
    files = sorted(p for p in root.glob("*/*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise StitchError(f"image folder {str(root)!r} has no images in the <root>/<class>/<image> layout")
    identity = hashlib.sha256("".join(f"{p.relative_to(root)}:{p.stat().st_size};" for p in files).encode())
    key = identity.hexdigest()[:16]
    for path in _cache_paths(root, cache_dir):
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    if (handle.metadata() or {}).get("files") == key:
                        classes = handle.metadata()["classes"].split("\n")
                        return TensorImages(
                            handle.get_tensor("images"), handle.get_tensor("labels"), mean=mean, std=std,
                            augment=augment, classes=classes,
                        )  # fmt: skip
            except Exception:
                pass
    images, labels, classes = _decode(root, files)
    for path in _cache_paths(root, cache_dir):
        try:
            with atomic_path(path) as tmp:
                save_file({"images": images, "labels": labels}, str(tmp), {"files": key, "classes": "\n".join(classes)})
            break
        except StitchError:  # not writable: try the next place
            continue
    return TensorImages(images, labels, mean=mean, std=std, augment=augment, classes=classes)


def _cache_paths(root: Path, cache_dir: Any) -> list[Path]:
    base = Path(cache_dir or os.environ.get("MODELSTITCH_CACHE_DIR") or Path.home() / ".cache" / "modelstitch")
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return [base / f"{root.name}-{digest}.uint8.safetensors", root.with_name(root.name + ".uint8.safetensors")]


def _decode(root: Path, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import numpy as np
    from PIL import Image

    classes = sorted({p.parent.name for p in files})
    index = {c: i for i, c in enumerate(classes)}
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    if len({a.shape for a in arrays}) != 1:
        raise StitchError(f"{root}: images of several sizes; decoded_image_folder needs one size (resize them first)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([index[p.parent.name] for p in files])
    return images, labels, classes
