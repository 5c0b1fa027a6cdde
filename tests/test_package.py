"""The package's shape: a small lazy top level, layered subpackages, and a fast command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import modelstitch as ms
from modelstitch import cli

HEAVY = ("torch", "torchvision", "matplotlib", "ray", "sklearn", "timm")


def _loaded_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "code, allowed",
    [
        ("import modelstitch", set()),
        ("import modelstitch as ms; ms.stitch; ms.Study; ms.train_stitch", {"torch"}),
        ("import modelstitch.cli as c; c._parser()", {"torch"}),
        ("from modelstitch import analysis, study, zoo, data", {"torch"}),
    ],
)
def test_imports_load_only_what_they_need(code, allowed):
    assert _loaded_after(code) <= allowed


def test_top_level_names_resolve_and_none_differ_only_by_case():
    names = [n for n in ms.__all__ if not n.startswith("__")]
    for name in names:
        assert getattr(ms, name) is not None, name
    lowered = [n.lower() for n in names]
    assert len(set(lowered)) == len(lowered), sorted(names)
    assert len(names) <= 22  # a top level a reader can hold in their head


def test_the_card_call_works_as_written():
    import torch
    import torchvision

    a, b = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    assert stitched(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_cli_lists_a_vit_at_its_own_input_size(capsys):
    assert cli.main(["layers", "vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "blocks.11" in out
    assert "(197, 192)" in out  # 14 x 14 patches + class token at 224 x 224, from timm's pretrained_cfg


def test_the_cli_counts_the_processes_running_now_not_the_load_average():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this platform: the load average is used")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert cli._runnable_others() >= 2  # the two spinners (and whatever else runs)
        assert cli._free_cores(2) == 1  # never fewer than one thread
    finally:
        for p in spinners:
            p.kill()
            p.wait()
