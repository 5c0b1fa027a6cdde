"""`ActivationCache`: per-sample tensors of a dataset, held in RAM or spilled to disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .._errors import StitchError

__all__ = ["ActivationCache"]

_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


class ActivationCache:
    """Rows of per-sample tensors (activations, inputs, labels) for ``capacity`` samples.

    Arrays are allocated on the first write of each key. They live in RAM (on
    ``device``) while the running total stays under ``memory_budget`` bytes;
    later arrays are numpy memory maps in a temporary directory that `close`
    deletes. Use it as a context manager.

    Examples:
        >>> with ActivationCache(4, memory_budget=0) as cache:  # everything on disk
        ...     cache.write("a", 0, torch.arange(6.0).reshape(2, 3))
        ...     cache.write("a", 2, torch.ones(2, 3))
        ...     cache.gather("a", torch.tensor([3, 0]))
        tensor([[1., 1., 1.],
                [0., 1., 2.]])
    """

    def __init__(
        self,
        capacity: int,
        *,
        memory_budget: int = 2 * 1024**3,
        device: torch.device | str = "cpu",
        directory: str | Path | None = None,
    ) -> None:
        if capacity <= 0:
            raise StitchError(f"an activation cache needs at least one sample, got capacity={capacity}")
        self.capacity = capacity
        self.memory_budget = memory_budget
        self.device = torch.device(device)
        self.directory = directory
        self.rows = 0
        self._ram: dict[str, torch.Tensor] = {}
        self._disk: dict[str, np.memmap] = {}
        self._tmp: Path | None = None
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def write(self, key: str, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (``[b, ...]``) at sample positions ``start .. start + b``."""
        end = start + rows.shape[0]
        if end > self.capacity:
            raise StitchError(f"activation cache overflow: {end} samples for a capacity of {self.capacity}")
        if key not in self:
            self._allocate(key, tuple(rows.shape[1:]), rows.dtype)
        if key in self._ram:
            self._ram[key][start:end] = rows.to(self.device, non_blocking=True)
        else:
            self._disk[key][start:end] = rows.detach().cpu().numpy()
        self.rows = max(self.rows, end)

    def gather(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows at sample positions ``index`` (``[b]``), as a ``[b, ...]`` tensor."""
        if key in self._ram:
            return self._ram[key].index_select(0, index.to(self.device))
        rows = self._disk[key][np.sort(index.cpu().numpy())]
        order = torch.argsort(torch.argsort(index.cpu()))
        return torch.from_numpy(rows)[order]

    def _allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        nbytes = self.capacity * int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if self.bytes_in_memory + nbytes <= self.memory_budget:
            self._ram[key] = torch.empty((self.capacity, *shape), dtype=dtype, device=self.device)
            self.bytes_in_memory += nbytes
            return
        if dtype not in _NUMPY:
            raise StitchError(f"cannot spill {dtype} activations to disk; raise memory_budget")
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="modelstitch-cache-", dir=self.directory))
        path = self._tmp / f"{len(self._disk)}.npy"
        self._disk[key] = np.lib.format.open_memmap(path, mode="w+", dtype=_NUMPY[dtype], shape=(self.capacity, *shape))
        self.bytes_on_disk += nbytes

    def close(self) -> None:
        """Free the arrays and delete any files on disk."""
        self._ram.clear()
        self._disk.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
