"""Which token positions should count? First-token norms and the least-squares fit, on trained small LMs.

`modelstitch.core.Positions` can leave out the first ``k`` positions of every sequence (``skip_first``) and
positions whose norm is far above the batch median (``max_norm_ratio``): in large trained language models the
first token's residual stream often has a norm far above the rest (an "attention sink"), and in a least-squares
fit its error, squared, would weigh most. This script measures whether that holds for the networks of the
``lm-quick`` preset, and what each setting does to a stitch, so that the default can be chosen from numbers.

Given a run folder of ``modelstitch study run --preset lm-quick`` (its trained networks in ``RUN/zoo/``), on the
preset's test split (the last 10% of `pydoc_corpus`, 128 sequences of 64 bytes):

1. For every block of each trained network: the median over sequences of ``‖h_0‖ / median_t ‖h_t‖`` (the first
   position's norm against the sequence's median), and the largest ratio of any position's norm to its batch
   median.
2. For every cell of the first network into the second (every block into every block): the least-squares stitch
   alone (`modelstitch.stitches.fit_least_squares_all` on the preset's 512 training sequences, no training), with
   each ``Positions`` setting, scored by `modelstitch.train.score_stitches` (loss recovered against mean
   ablation, and the FVU over all unpadded positions, so that every setting is scored on the same positions).

Prints a table and, with ``--json PATH``, writes the numbers.

Usage::

    modelstitch study run --preset lm-quick --out runs/lm-quick
    python benchmarks/lm_positions.py runs/lm-quick [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import modelstitch as ms
from modelstitch import zoo
from modelstitch.data import subset
from modelstitch.study import PRESETS, load_dataset

SETTINGS = {
    "padding only (default)": None,
    "skip_first=1": ms.core.Positions(skip_first=1),
    "max_norm_ratio=5": ms.core.Positions(max_norm_ratio=5.0),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder of the lm-quick preset")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["lm-quick"]
    names = preset.network_names()
    nets = {n: zoo.load_language_model(args.run / "zoo" / f"{n}.safetensors") for n in dict.fromkeys(names)}
    train = subset(load_dataset("pydoc", train=True), preset.limit)
    test = subset(load_dataset("pydoc", train=False), preset.test_limit)
    batch = {"input_ids": test.input_ids, "attention_mask": test.attention_mask}  # the whole split, one batch

    norms = {}
    for name, net in nets.items():
        layers = zoo.layer_names(net)
        reps = ms.activations(net, batch, layers)
        rows = {}
        for layer in layers:
            n = reps[layer].norm(dim=-1)  # [B, T]
            first = (n[:, 0] / n[:, 1:].median(dim=1).values).median()
            rows[layer] = {"first_to_median": float(first), "max_to_batch_median": float(n.max() / n.median())}
        norms[name] = rows

    a, b = names[0], names[1]
    fits = {}
    for label, positions in SETTINGS.items():
        cells = [
            ms.stitch(nets[a], la, nets[b], lb, example_input={k: v[:2] for k, v in batch.items()}, init="random")
            for la in zoo.layer_names(nets[a])
            for lb in zoo.layer_names(nets[b])
        ]
        ms.stitches.fit_least_squares_all(cells, train, device="cpu", positions=positions)
        scores = ms.train.score_stitches(cells, test, device="cpu")
        fits[label] = {
            "loss_recovered_mean": statistics.fmean(s["loss_recovered_mean"] for s in scores),
            "worst_loss_recovered_mean": min(s["loss_recovered_mean"] for s in scores),
            "fvu": statistics.fmean(s["fvu"] for s in scores),
            "cells": len(scores),
        }

    print("first-position norm / median norm (median over sequences); largest norm / batch median")
    for name, rows in norms.items():
        for layer, r in rows.items():
            print(f"  {name:4} {layer:16} {r['first_to_median']:6.2f} {r['max_to_batch_median']:6.2f}")
    print(f"least-squares stitches alone, {a} -> {b}, every block into every block, on the test split:")
    for label, r in fits.items():
        print(
            f"  {label:24} mean loss recovered {r['loss_recovered_mean']:.4f} "
            f"(worst {r['worst_loss_recovered_mean']:.4f}), mean FVU {r['fvu']:.4f} over {r['cells']} cells"
        )
    result = {"norms": norms, "fits": fits, "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
