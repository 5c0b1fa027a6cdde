"""Time all-layer-pairs streaming linear CKA against the forward pass it rides on.

Two CIFAR-style ResNets ``R1111`` (`modelstitch.zoo.small_resnet`, ``--width`` 16, random weights, eval mode)
see the same ``--n`` random images ``[N, 3, 32, 32]`` in batches of ``--batch-size``. Two passes over the data
are timed, interleaved and repeated (``--repeats``; the median of each is kept):

- ``forward``: both networks' forward passes under ``torch.no_grad``, nothing else.
- ``streaming``: the same passes, but each batch's outputs of every layer in ``zoo.layer_names`` (stem and the
  four blocks, 5 x 5 = 25 layer pairs) are captured with ``modelstitch.activations`` and fed to
  ``modelstitch.metrics.MinibatchCKA.update`` (unbiased HSIC, ``rule="flatten"``); ``compute()`` at the end.

Printed and written to ``--json``: seconds of each pass, ``cka_seconds`` = streaming - forward (what capture
and update add), ``update_seconds`` (the time inside ``update`` alone), and ``ratio`` = streaming / forward,
whose target is at most 2 (computing CKA for all layer pairs costs no more than the forward pass itself).

Usage::

    python benchmarks/bench_measures.py [--n 10000] [--batch-size 256] [--width 16] [--threads 1]
                                        [--repeats 3] [--device cpu|cuda|auto] [--json PATH]

``--threads`` (default 1) sets torch's intra-op threads: on a CPU shared with other busy processes, one thread
avoids the stalls of thread pools waiting for a busy core. Random weights and inputs suffice for timing: the
cost of a forward pass and of a Gram matrix does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import modelstitch as ms
from modelstitch import zoo
from modelstitch.metrics import MinibatchCKA

TARGET_RATIO = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of ``x``; a last batch under 4 samples (too small for the unbiased HSIC) joins the one before."""
    starts = list(range(0, x.shape[0], batch_size))
    if len(starts) > 1 and x.shape[0] - starts[-1] < 4:
        starts.pop()
    ends = [*starts[1:], x.shape[0]]
    return [x[s:e] for s, e in zip(starts, ends)]


@torch.no_grad()
def _forward(models: Sequence[torch.nn.Module], batches: Sequence[torch.Tensor], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for xb in batches:
        for model in models:
            model(xb)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _streaming(
    models: Sequence[torch.nn.Module], layers: Sequence[Sequence[str]], batches: Sequence[torch.Tensor], device
) -> tuple[float, float, Any]:
    cka = MinibatchCKA()
    update_s = 0.0
    _sync(device)
    start = time.perf_counter()
    for xb in batches:
        feats_a = ms.activations(models[0], xb, list(layers[0]))
        feats_b = ms.activations(models[1], xb, list(layers[1]))
        _sync(device)
        t = time.perf_counter()
        cka.update(feats_a, feats_b)
        _sync(device)
        update_s += time.perf_counter() - t
    matrix = cka.compute()
    _sync(device)
    return time.perf_counter() - start, update_s, matrix


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--width", type=int, default=16, help="ResNet width (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each pass; the median is kept")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.n < 4 or args.batch_size < 4 or args.repeats < 1 or args.threads < 1:
        parser.error("--n and --batch-size must be at least 4; --repeats and --threads at least 1")

    torch.set_num_threads(args.threads)
    device = _device(args.device)
    generator = torch.Generator().manual_seed(0)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(zoo.small_resnet("R1111", width=args.width).eval().to(device))
    layers = [zoo.layer_names(m) for m in models]
    x = torch.randn(args.n, 3, 32, 32, generator=generator).to(device)
    batches = _batches(x, args.batch_size)

    _forward(models, batches[:1], device)  # warm-up: allocator, kernels, hooks
    _streaming(models, layers, batches[:1], device)
    forward_s, streaming_s, update_s = [], [], []
    matrix = None
    for _ in range(args.repeats):
        forward_s.append(_forward(models, batches, device))
        seconds, in_update, matrix = _streaming(models, layers, batches, device)
        streaming_s.append(seconds)
        update_s.append(in_update)

    forward = statistics.median(forward_s)
    streaming = statistics.median(streaming_s)
    result: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "config": {
            "n": args.n,
            "batch_size": args.batch_size,
            "batches": len(batches),
            "width": args.width,
            "repeats": args.repeats,
            "layers": layers[0],
            "layer_pairs": len(layers[0]) * len(layers[1]),
        },
        "seconds": {"forward": forward, "streaming": streaming},
        "cka_seconds": streaming - forward,
        "update_seconds": statistics.median(update_s),
        "ratio": streaming / forward,
        "target_ratio": TARGET_RATIO,
        "cka_diagonal": [round(float(v), 4) for v in matrix.diagonal()] if matrix is not None else None,
    }
    print(f"device {device}, {args.threads} thread(s), N={args.n}, batch {args.batch_size}, width {args.width}")
    print(f"layers: {', '.join(layers[0])} ({result['config']['layer_pairs']} pairs)")
    print(f"forward    {forward:9.3f} s   both networks, no capture")
    print(f"streaming  {streaming:9.3f} s   same pass + capture + MinibatchCKA.update (+ compute)")
    print(f"cka        {result['cka_seconds']:9.3f} s   added by CKA; inside update: {result['update_seconds']:.3f} s")
    print(f"ratio      {result['ratio']:9.3f}     streaming / forward (target <= {TARGET_RATIO})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
