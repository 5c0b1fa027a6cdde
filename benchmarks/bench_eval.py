"""Evaluation with channels-last inputs on the CPU against inputs as they come: time and agreement, one pair.

Every cell of one ordered pair of the quick preset's networks (digits) or the cifar-small preset's (CIFAR-10),
started from least squares, is evaluated on the preset's test images with `evaluate_stitches` as a `Study`
does (batches of 256), once with its default (4-D inputs channels-last on the CPU, `core.ForwardLayout`) and
once with ``channels_last=False``, alternately ``--reps`` times each. It prints the median time of each, their
ratio and how far the two evaluations' accuracies and losses are apart.

Usage::

    python benchmarks/bench_eval.py [--data digits|cifar10] [--data-root DIR] [--out DIR] [--threads N]
        [--pair R1211,R1111] [--reps 3] [--json PATH]

The networks are trained once into ``--out`` (as in ``bench_study.py``, whose ``--out`` they may share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from _networks import pair_cells, preset_networks

import modelstitch as ms
from modelstitch.train import holdout_split


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--pair", default="R1211,R1111")
    parser.add_argument("--limit", type=int, help="training (and test) samples")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-study")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    preset, train, test, models = preset_networks(args.data, args.data_root, args.limit, args.out, cpu)
    a, b = args.pair.split(",")
    part, _ = holdout_split(train, preset.recipe.holdout, seed=preset.recipe.seed)
    example = torch.stack([train[i][0] for i in range(2)])
    cells = pair_cells(models, args.pair, example)
    ms.stitches.fit_least_squares_all(cells, part, batch_size=256, device=cpu)

    def evaluate(channels_last: bool) -> tuple[float, list[dict[str, Any]]]:
        start = time.perf_counter()
        results = ms.train.evaluate_stitches(cells, test, device=cpu, batch_size=256, channels_last=channels_last)
        return time.perf_counter() - start, results

    evaluate(True), evaluate(False)  # warm-up: oneDNN's kernels for both layouts
    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, list[dict[str, Any]]] = {}
    for _ in range(args.reps):
        for layout in (True, False):
            seconds, results[layout] = evaluate(layout)
            times[layout].append(seconds)
    fast, plain = statistics.median(times[True]), statistics.median(times[False])
    pairs = list(zip(results[True], results[False]))
    summary = {
        "data": args.data,
        "pair": [a, b],
        "threads": torch.get_num_threads(),
        "cells": len(cells),
        "test_images": len(test),
        "seconds_channels_last": fast,
        "seconds_as_given": plain,
        "time_ratio": fast / plain,
        "cells_with_another_accuracy": sum(x["accuracy"] != y["accuracy"] for x, y in pairs),
        "largest_accuracy_difference": max(abs(x["accuracy"] - y["accuracy"]) for x, y in pairs),
        "largest_loss_difference": max(abs(x["loss"] - y["loss"]) / max(abs(y["loss"]), 1e-12) for x, y in pairs),
    }
    print(f"{len(cells)} cells on {len(test)} test images: channels-last {fast:.2f} s, as given {plain:.2f} s "
          f"(ratio {summary['time_ratio']:.2f}, medians of {args.reps})")  # fmt: skip
    print(f"cells whose accuracy differs: {summary['cells_with_another_accuracy']}; largest relative loss "
          f"difference {summary['largest_loss_difference']:.1e}")  # fmt: skip
    if args.json:
        ms.core.write_text(args.json, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
