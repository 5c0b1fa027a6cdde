"""Seconds per stitch-epoch of a study's pair at the paper's scale, split into per-epoch and per-cell fixed costs.

One ordered pair of small ResNets (``--arch``, default R2222, the paper's largest; ``--width`` 64, random
weights: time does not depend on their values) on ``--samples`` random 32x32 images (default 50,000, CIFAR-10's
training set) is run as a `Study` runs it (least-squares start, held-out selection, the activation cache, one
pass over the data for every cell of the pair, then the test evaluation), after a warm-up study on a few
batches, once for each of ``--epochs`` (default 1 and 2). The difference between the two runs is what one more
epoch of every cell costs, so

- ``seconds_per_stitch_epoch`` = (seconds at 2 epochs - seconds at 1 epoch) / cells, and
- ``fixed_seconds_per_cell`` = what remains of the 1-epoch run per cell (least squares, the cache, evaluation).

A study's time is then about ``cells * (fixed + epochs * seconds_per_stitch_epoch)``; `cost_model.py` fits the
same split on the CPU. ``--sender-layers`` takes a few sender layers (every receiver layer is kept, since the cost
of a cell is set by its receiver's depth after the cut) to keep the run short. Peak CUDA memory is reported.

Usage::

    python benchmarks/bench_epoch.py [--device cuda] [--arch R2222] [--width 64] [--samples 50000]
        [--sender-layers stem,layer2.0,layer4.1] [--batch-size 256] [--epochs 1,2] [--share-suffix] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

import modelstitch as ms
from modelstitch import zoo


def run_study(
    nets: dict, layers: dict, train: Any, test: Any, recipe: ms.Recipe, device: torch.device, **options: Any
) -> tuple[float, int]:
    """Seconds for one study of the pair A -> B at ``recipe``, and its number of cells."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        study = ms.Study(
            nets, train_data=train, test_data=test, out=out, pairs=[("A", "B")], layers=layers, recipe=recipe,
            device=device, sanity=False, **options,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: flat accuracies, on purpose
            study.run(progress=False)
        cells = len(study.rows())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, cells


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="R2222")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=50_000, help="random training images (default 50,000)")
    parser.add_argument("--test-samples", type=int, default=10_000)
    parser.add_argument("--sender-layers", help="comma-separated sender layers (default: all)")
    parser.add_argument("--batch-size", type=int, help="the recipe's batch size (default: the paper preset's)")
    parser.add_argument("--epochs", default="1,2", help="two epoch counts; their difference is timed")
    parser.add_argument("--memory-budget-gib", type=float, default=64, help="the activation cache's budget")
    parser.add_argument("--share-suffix", action="store_true", help="cells into one receiver layer share its suffix")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ms.core.resolve_device(args.device)
    nets = {}
    for seed, name in enumerate("AB"):
        torch.manual_seed(seed)
        nets[name] = zoo.small_resnet(args.arch, width=args.width).eval()
    every = zoo.layer_names(nets["A"])
    layers = {"A": args.sender_layers.split(",") if args.sender_layers else every, "B": every}
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

    train, test = images(args.samples), images(args.test_samples)
    recipe = ms.study.PRESETS["paper"].recipe
    if args.batch_size:
        recipe = recipe.replace(batch_size=args.batch_size)
    first, second = (float(e) for e in args.epochs.split(","))
    options = {"memory_budget": int(args.memory_budget_gib * 2**30), "share_suffix": args.share_suffix}
    warm = ms.data.subset(train, min(len(train), 4 * recipe.batch_size))  # kernels, allocator, lazy init
    run_study(nets, layers, warm, ms.data.subset(test, 256), recipe.replace(epochs=1), device, **options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = {}
    for epochs in (first, second):
        seconds, cells = run_study(nets, layers, train, test, recipe.replace(epochs=epochs), device, **options)
        runs[epochs] = seconds
        print(f"{epochs:g} epochs: {seconds:.1f} s for {cells} cells", flush=True)
    per_epoch = (runs[second] - runs[first]) / (second - first) / cells
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "arch": args.arch,
        "width": args.width,
        "samples": args.samples,
        "cells": cells,
        "layers": layers,
        "recipe": repr(recipe),
        "share_suffix": args.share_suffix,
        "seconds": {f"{k:g}": v for k, v in runs.items()},
        "seconds_per_stitch_epoch": per_epoch,
        "fixed_seconds_per_cell": runs[first] / cells - first * per_epoch,
        "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(
        f"{args.arch} width {args.width}, {args.samples} images, {cells} cells: "
        f"{per_epoch:.3f} s per stitch-epoch, {result['fixed_seconds_per_cell']:.3f} s fixed per cell"
        + (f", peak CUDA {result['peak_cuda_gib']:.1f} GiB" if result["peak_cuda_gib"] is not None else "")
    )
    if args.json:
        ms.core.write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
