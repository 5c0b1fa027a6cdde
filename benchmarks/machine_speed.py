"""How fast this machine is right now: two short probes to print beside a timing.

The same 2-core cloud machine type can run the same work at very different speeds: on 2026-12-03 the quick
preset (identical cells, identical numbers) took 2 min 55 s at 13:41 and 1 min 28 s at 14:09 on one idle
machine, with twice the CPU time for the same work (docs/performance.md, "The quick preset"). A wall time is only
comparable with another taken at the same speed, so `.ci/run` prints these probes after each README command and the
docs quote them beside the times they cite:

- ``matmul_gflops``: a float32 1024 x 1024 matrix product, in GFLOP/s (``2 n^3`` operations a product);
- ``resnet_step_ms``: one training step's compute in the quick preset, in milliseconds: a frozen width-8 R1211
  (`modelstitch.zoo.small_resnet`) in eval mode, forward and backward to its input, on a batch of 64 random
  3 x 32 x 32 images (the preset's batch and image size; the receiver's weights take no gradients, as in
  stitch training).

Each probe is timed ``--repeats`` times after a warm-up and the median is kept. Printed in one line and written
to ``--json`` with torch's version, the thread count and the CPU count. No speed thresholds: it measures, it does
not judge.

Usage::

    python benchmarks/machine_speed.py [--threads N] [--repeats R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from modelstitch import zoo


def _median_seconds(work: Callable[[], object], repeats: int, calls: int) -> float:
    """The median over ``repeats`` timings of ``calls`` calls of ``work``, per call, after two warm-up calls."""
    for _ in range(2):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both probes on the CPU; returns the result dictionary (see the module docstring)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    n = 1024
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    matmul = _median_seconds(lambda: a @ b, args.repeats, calls=10)

    torch.manual_seed(0)
    receiver = zoo.small_resnet((1, 2, 1, 1), width=8).eval().requires_grad_(False)
    images = torch.randn(64, 3, 32, 32, generator=generator, requires_grad=True)

    def step() -> None:
        receiver(images).sum().backward()

    resnet = _median_seconds(step, args.repeats, calls=5)
    return {
        "matmul_gflops": 2 * n**3 / matmul / 1e9,
        "resnet_step_ms": resnet * 1e3,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "repeats": args.repeats,
    }


def report(result: dict[str, Any]) -> str:
    """One line: both probes and the threads they ran on."""
    return (
        f"machine speed: matmul {result['matmul_gflops']:.0f} GFLOP/s, quick-preset step "
        f"{result['resnet_step_ms']:.1f} ms ({result['threads']} threads, {result['cpu_count']} CPUs, "
        f"torch {result['torch']})"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each probe; the median is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run, print the line, write ``--json``; returns the result."""
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
