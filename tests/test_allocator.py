"""`keep_freed_memory`: glibc's malloc serves activation-sized tensors from its heap, seen in its own accounting."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# a new process each time: mallopt settings are for the whole process and cannot be undone
_SCRIPT = """
import ctypes, json, sys
import torch
from modelstitch.core import keep_freed_memory

class Info(ctypes.Structure):  # struct mallinfo2 (glibc 2.33+)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd  # bytes in blocks that have a mapping of their own
tensor = torch.empty(24 * 2**20, dtype=torch.uint8)  # activation-sized: a CIFAR-10 batch's are 4 to 16 MiB
print(json.dumps({"applied": applied, "mapped": libc.mallinfo2().hblkhd - before}))
"""


def _run(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True, env=environ | env
    )
    return json.loads(done.stdout)


def test_an_activation_sized_tensor_comes_from_the_heap_not_a_fresh_mapping():
    size = 24 * 2**20
    assert _run("default") == {"applied": None, "mapped": pytest.approx(size, rel=0.01)}  # glibc's default
    assert _run("keep") == {"applied": True, "mapped": 0}


@pytest.mark.parametrize(
    "env", [{"MALLOC_TRIM_THRESHOLD_": "1000000"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}]
)
def test_a_malloc_setting_from_the_environment_is_left_alone(env):
    result = _run("keep", **env)
    assert result["applied"] is False
    if "GLIBC_TUNABLES" in env:  # its 64 KiB threshold still holds: the tensor gets a mapping of its own
        assert result["mapped"] == pytest.approx(24 * 2**20, rel=0.01)
