"""Peak memory of a study against its number of cells: more pairs, and more layers per pair.

Each point is a whole `Study` run in a fresh Python process, so its peak is its own and not a leftover of the
point before: the child builds ``--networks`` small ResNets (``--arch``, random weights, ``--width``; memory
does not depend on the values of the weights), trains every cell of its pairs on the offline digits
(``--limit`` images, the preset's default recipe for ``--epochs``), stores them and reports

- ``setup_rss_mib``: resident memory once the networks and data are loaded, before the study runs;
- ``peak_rss_mib``: the process's peak resident memory while the study ran (Linux's ``VmHWM``, reset after
  setup through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``), so ``peak - setup`` is what the study
  itself added at its worst;
- ``peak_cuda_mib``: on CUDA, the peak memory torch allocated.

Two sweeps are run (``--pairs`` and ``--layers`` choose their points):

- pairs: 1, 2, 4, 8 ordered pairs with all layers (36 cells each): a long study must not grow with the
  pairs it has finished;
- layers: one pair with 1, 2, 4, 6 sender layers into all 6 receiver layers (6 to 36 cells): the cells of
  one pair train together, so what grows is bounded by the activation cache (``--memory-budget``, then
  spilled to disk) and one suffix group's graph.

Usage::

    python benchmarks/bench_memory.py [--device cpu|cuda|auto] [--pairs 1,2,4,8] [--layers 1,2,4,6]
        [--networks 4] [--limit 512] [--epochs 0.5] [--memory-budget BYTES] [--share-suffix] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import modelstitch as ms


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Run one study in this process and report its memory (the body of a sweep point)."""
    from modelstitch import zoo
    from modelstitch.study import PRESETS, load_dataset

    torch.set_num_threads(config["threads"])
    device = ms.core.resolve_device(config["device"])
    nets = {}
    for k in range(config["networks"]):
        torch.manual_seed(k)
        nets[f"N{k}"] = zoo.small_resnet(config["arch"], width=config["width"]).eval()
    every = zoo.layer_names(next(iter(nets.values())))
    pairs = list(itertools.permutations(nets, 2))[: config["pairs"]]
    layers = dict.fromkeys(nets, every)
    if config["sender_layers"] is not None:  # one pair: its sender's deepest layers (smallest maps, most upsampled)
        layers[pairs[0][0]] = every[-config["sender_layers"] :]
    preset = PRESETS["quick"]
    train = ms.data.subset(load_dataset("digits", train=True), config["limit"])
    test = ms.data.subset(load_dataset("digits", train=False), config["limit"])
    recipe = preset.recipe.replace(epochs=config["epochs"], patience=None, min_delta=0.0)  # every step: no early stop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = _status_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        study = ms.Study(
            nets, train_data=train, test_data=test, out=out, pairs=pairs, layers=layers, recipe=recipe,
            device=device, sanity=False, share_suffix=config["share_suffix"],
            **({"memory_budget": config["memory_budget"]} if config["memory_budget"] is not None else {}),
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few steps per stitch, on purpose
            study.run(progress=False)
        cells = len(study.rows())
    return {
        **config,
        "cells": cells,
        "seconds": time.perf_counter() - start,
        "setup_rss_mib": setup,
        "peak_rss_mib": _status_mib("VmHWM"),
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh from the current resident memory (Linux 4.0+), so setup's own peak is out."""
    with contextlib.suppress(OSError):  # elsewhere the peak includes the setup
        Path("/proc/self/clear_refs").write_text("5")


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) from /proc/self/status; without /proc, the peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_point(config: dict[str, Any]) -> dict[str, Any]:
    """One sweep point in a fresh interpreter; returns its report."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the sweep point {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pairs", default="1,2,4,8", help="points of the pairs sweep ('' to skip it)")
    parser.add_argument("--layers", default="1,2,4,6", help="points of the sender-layers sweep ('' to skip it)")
    parser.add_argument("--networks", type=int, default=4)
    parser.add_argument("--arch", default="R1211")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--limit", type=int, default=512, help="training and test images")
    parser.add_argument("--epochs", type=float, default=0.5)
    parser.add_argument("--memory-budget", type=int, help="the study's cache budget in bytes (default: its own)")
    parser.add_argument("--share-suffix", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    base = {
        "device": args.device, "networks": args.networks, "arch": args.arch, "width": args.width,
        "limit": args.limit, "epochs": args.epochs, "memory_budget": args.memory_budget,
        "share_suffix": args.share_suffix, "threads": args.threads,
    }  # fmt: skip
    points = [
        {**base, "sweep": "pairs", "pairs": int(p), "sender_layers": None} for p in filter(None, args.pairs.split(","))
    ] + [{**base, "sweep": "layers", "pairs": 1, "sender_layers": int(n)} for n in filter(None, args.layers.split(","))]
    results = []
    print("| sweep | pairs | cells | setup RSS MiB | peak RSS MiB | peak - setup MiB | peak CUDA MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for point in points:
        r = run_point(point)
        results.append(r)
        cuda = "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        print(
            f"| {r['sweep']} | {r['pairs']} | {r['cells']} | {r['setup_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['setup_rss_mib']:.0f} | {cuda} | {r['seconds']:.1f} |",
            flush=True,
        )
    summary = {"torch": torch.__version__, "results": results}
    if args.json:
        ms.core.write_text(args.json, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
