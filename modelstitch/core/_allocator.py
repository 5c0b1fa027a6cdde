"""`keep_freed_memory`: the C allocator keeps freed memory for reuse instead of returning it to the system."""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

MMAP_THRESHOLD = 32 * 2**20
"""Blocks below this many bytes come from malloc's heap, not from a fresh ``mmap`` (glibc's largest allowed)."""

TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap is returned to the system only beyond this many bytes."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed activation-sized blocks instead of mapping fresh pages each time.

    By default glibc serves a block of more than 128 KiB with a fresh
    ``mmap`` and unmaps it when it is freed, so every batch's activations
    and gradients come back as new pages the kernel must fault in and zero;
    it raises that threshold only as it sees such blocks freed, which is why
    a process's first study runs slower than the same study again. This sets
    the threshold to `MMAP_THRESHOLD` (32 MiB) and stops returning free heap
    memory to the system below `TRIM_THRESHOLD` (2 GiB), for the whole
    process (``mallopt``). Measured on CIFAR-10 (docs/performance.md, "A
    warm process"): the paper's recipe on 30 cells took 24% less time in a
    new process and 5.5% less in a warm one, the default recipe 9% less; peak
    memory rose by 1%. The command line does this for every command that
    trains or evaluates; call it once at the start of your own scripts.

    Returns:
        Whether the settings were applied: ``False`` off Linux with glibc,
        and where the environment already sets malloc's thresholds
        (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
        ``glibc.malloc`` in ``GLIBC_TUNABLES``), which are left as they are.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    from_environment = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    )
    if from_environment:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
