"""Run every script in examples/ with ``--quick --device cpu`` and check what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> text its output must contain
EXPECTED = {
    "quickstart.py": ["receiver accuracy", "stitched accuracy (after)", "stitching penalty", "Upsample"],
    "resnet_study.py": ["71 cells over 4 pairs", "R1111 -> R2111", "R1111 random -> R2111 random", "heatmaps.png"],
    "cross_architecture.py": ["TokensToMap", "MapToTokens", "receiver_suffix.method = 'graph'", "method 'hook'"],
    "custom_model.py": ["act:0", "act:1", "runs 2 times per forward", "suffix='hook'", "stitching penalty"],
    "stitch_anything.py": ["layer2.0", "vit[blocks.5] -> resnet18[layer3.0]", "suffix:"],
}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    # one thread per process: on a small shared CPU, oversubscribed torch threads are many times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--device", "cpu"],
        cwd=tmp_path,  # anything an example writes (resnet_study.py's runs/...) lands here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for text in EXPECTED[script]:
        assert text in proc.stdout, f"{script}: {text!r} not in its output:\n{proc.stdout[-3000:]}"
