"""Test-session settings: one torch thread per pytest-xdist worker, so parallel workers do not oversubscribe."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # each worker is one process of several on the same cores: torch's thread pools would fight over them
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses the tests start


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (threads only add overhead, and stall on a busy machine).

    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
