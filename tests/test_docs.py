"""The Python snippets of the docs run as written (in a scratch folder, on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
# pages whose ```python blocks are complete programs (others show fragments that need your own networks/data)
RUNNABLE = ["study.md", "language-models.md", "training.md", "measures.md"]


def _blocks(page: str) -> list[str]:
    """The page's ```python blocks, less those written as doctests (``>>>``: pytest's doctest-glob runs them)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    return [b for b in blocks if not b.lstrip().startswith(">>>")]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_python_blocks_run_as_written(page, tmp_path):
    blocks = _blocks(page)
    assert blocks, f"{page} has no python block"
    for i, code in enumerate(blocks):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "MPLBACKEND": "Agg"},
            timeout=600,
        )
        assert result.returncode == 0, f"{page} block {i} failed:\n{code}\n{result.stderr[-3000:]}"
