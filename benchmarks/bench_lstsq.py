"""Least-squares starts from float32 products against a float64 fit: time and agreement, every cell of one pair.

For every cell of one ordered pair of the quick preset's networks (digits) or the cifar-small preset's
(CIFAR-10), the start is fitted twice on the same training part (the default recipe's, after its hold-out):
once with `fit_least_squares_all`, whose per-batch products are float32 summed in float64, and once as a
float64 reference (the same activations fed to `LeastSquares` in float64, which keeps them so). It prints
both times and, per cell, how far the float32 fit's outputs are from the reference's on the test images
(relative norm) and both starts' test accuracy.

Usage::

    python benchmarks/bench_lstsq.py [--data digits|cifar10] [--data-root DIR] [--out DIR] [--threads N]
        [--limit N] [--json PATH]

The networks are trained once into ``--out`` (as in ``bench_study.py``, whose ``--out`` they may share).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _networks import pair_cells, preset_networks

import modelstitch as ms
from modelstitch.train import holdout_split

BATCH = 256  # the batch a Study fits least squares with (its eval_batch_size)


@torch.no_grad()
def fit_float64(models: list[ms.StitchedModel], data: Any, batch_size: int) -> None:
    """The reference: every cell's normal equations from float64 copies of the activations."""
    fits = [ms.stitches.LeastSquares(m.stitch) for m in models]
    prefixes = list({p.key: p for m in models for p in (m.sender_prefix, m.receiver_prefix)}.values())
    for x, _ in torch.utils.data.DataLoader(data, batch_size=batch_size):
        reps = ms.core.prefix_outputs(prefixes, x)
        for fit, m in zip(fits, models):
            fit.update(reps[m.sender_prefix.key].double(), reps[m.receiver_prefix.key].double())
    for fit in fits:
        fit.solve()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--pair", default="R1111,R1211")
    parser.add_argument("--limit", type=int, help="training (and test) samples")
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
    fitted, reference = pair_cells(models, args.pair, example), pair_cells(models, args.pair, example)
    start = time.perf_counter()
    ms.stitches.fit_least_squares_all(fitted, part, batch_size=BATCH, device=cpu)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    fit_float64(reference, part, BATCH)
    seconds_float64 = time.perf_counter() - start
    accuracy = ms.train.evaluate_stitches(fitted, test, device=cpu)
    accuracy_float64 = ms.train.evaluate_stitches(reference, test, device=cpu)
    images = torch.stack([test[i][0] for i in range(len(test))])
    rows = []
    for m, r, acc, acc64 in zip(fitted, reference, accuracy, accuracy_float64):
        with torch.no_grad():
            provided = ms.core.prefix_outputs([m.sender_prefix], images)[m.sender_prefix.key]
            got, want = m.stitch(provided), r.stitch(provided)
        rows.append(
            {
                "cell": f"{m.sender_layer} -> {m.receiver_layer}",
                "output_difference": float((got - want).norm() / want.norm()),
                "accuracy": acc["accuracy"],
                "accuracy_float64": acc64["accuracy"],
            }
        )
    worst = max(rows, key=lambda row: row["output_difference"])
    summary = {
        "data": args.data,
        "pair": [a, b],
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "seconds_float64": seconds_float64,
        "time_ratio": seconds / seconds_float64,
        "largest_output_difference": worst["output_difference"],
        "largest_output_difference_cell": worst["cell"],
        "cells_with_another_accuracy": sum(row["accuracy"] != row["accuracy_float64"] for row in rows),
        "largest_accuracy_difference": max(abs(row["accuracy"] - row["accuracy_float64"]) for row in rows),
        "cells": rows,
    }
    print(f"{len(rows)} cells: float32 products {seconds:.1f} s, float64 {seconds_float64:.1f} s "
          f"(ratio {summary['time_ratio']:.2f})")  # fmt: skip
    print(f"largest output difference {worst['output_difference']:.1e} ({worst['cell']}); cells whose start has "
          f"another test accuracy: {summary['cells_with_another_accuracy']} (largest difference "
          f"{summary['largest_accuracy_difference']:.4f})")  # fmt: skip
    if args.json:
        ms.core.write_text(args.json, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
