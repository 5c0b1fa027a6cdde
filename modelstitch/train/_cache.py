"""`ActivationCache`: per-sample tensors of a dataset, held in RAM or spilled to disk, in any dtype."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from .._errors import StitchError

__all__ = ["ActivationCache"]


class ActivationCache:
    """Rows of per-sample tensors (activations, inputs, labels) for ``capacity`` samples.

    Arrays are allocated on the first write of each key. They live in RAM (on
    ``device``) while the running total stays under ``memory_budget`` bytes;
    later arrays are memory-mapped files (``torch.from_file``) in a temporary
    directory that `close` deletes, so every dtype spills, bfloat16 included.
    Use it as a context manager.

    Args:
        capacity: samples per key.
        memory_budget: bytes kept in memory; the rest goes to disk.
        device: where the in-memory arrays live, and where `gather` returns
            every row (spilled rows are moved there).
        directory: where spilled arrays go (default: the system temp folder).
        dtype: store floating-point rows in this dtype (e.g. ``torch.bfloat16``
            to halve a float32 cache); ``None`` keeps each key's own dtype.
            Integer rows (labels) are always kept as they are.

    Examples:
        >>> with ActivationCache(4, memory_budget=0) as cache:  # everything on disk
        ...     cache.write("a", 0, torch.arange(6.0).reshape(2, 3))
        ...     cache.write("a", 2, torch.ones(2, 3))
        ...     cache.gather("a", torch.tensor([3, 0]))
        tensor([[1., 1., 1.],
                [0., 1., 2.]])
        >>> with ActivationCache(2, memory_budget=0) as cache:
        ...     cache.write("h", 0, torch.ones(2, 3, dtype=torch.bfloat16))
        ...     cache.gather("h", torch.tensor([1])).dtype
        torch.bfloat16
    """

    def __init__(
        self,
        capacity: int,
        *,
        memory_budget: int = 2 * 1024**3,
        device: torch.device | str = "cpu",
        directory: str | Path | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if capacity <= 0:
            raise StitchError(f"an activation cache needs at least one sample, got capacity={capacity}")
        if dtype is not None and not dtype.is_floating_point:
            raise StitchError(f"an activation cache's dtype must be a floating-point dtype or None, got {dtype}")
        self.capacity = capacity
        self.memory_budget = memory_budget
        self.device = torch.device(device)
        self.directory = directory
        self.dtype = dtype
        self.rows = 0
        self._ram: dict[str, torch.Tensor] = {}
        self._disk: dict[str, torch.Tensor] = {}
        self._tmp: Path | None = None
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def names(self) -> list[str]:
        """The keys written so far (in memory or on disk)."""
        return [*self._ram, *self._disk]

    def write(self, key: str, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (``[b, ...]``) at sample positions ``start .. start + b``."""
        end = start + rows.shape[0]
        if end > self.capacity:
            raise StitchError(f"activation cache overflow: {end} samples for a capacity of {self.capacity}")
        if self.dtype is not None and rows.is_floating_point():
            rows = rows.to(self.dtype)
        if key not in self:
            self._allocate(key, tuple(rows.shape[1:]), rows.dtype)
        if key in self._ram:
            self._ram[key][start:end] = rows.to(self.device, non_blocking=True)
        else:
            self._disk[key][start:end] = rows.detach().cpu()
        self.rows = max(self.rows, end)

    def gather(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows at sample positions ``index`` (``[b]``), as a ``[b, ...]`` tensor.

        Rows are returned on the cache's ``device`` wherever they are kept:
        spilled rows are read in file order, put back in ``index`` order and
        moved there.
        """
        if key in self._ram:
            return self._ram[key].index_select(0, index.to(self.device))
        index = index.cpu()
        order = torch.argsort(index)
        rows = self._disk[key].index_select(0, index[order])
        return rows[torch.argsort(order)].to(self.device)

    def _allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        numel = self.capacity * math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.bytes_in_memory + nbytes <= self.memory_budget:
            self._ram[key] = torch.empty((self.capacity, *shape), dtype=dtype, device=self.device)
            self.bytes_in_memory += nbytes
            return
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="modelstitch-cache-", dir=self.directory))
        path = self._tmp / f"{len(self._disk)}.bin"
        with open(path, "wb") as f:
            f.truncate(nbytes)
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        self._disk[key] = mapped.view(self.capacity, *shape)
        self.bytes_on_disk += nbytes

    def close(self) -> None:
        """Free the arrays and delete any files on disk."""
        self._ram.clear()
        self._disk.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
