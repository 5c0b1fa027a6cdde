"""Kornblith et al.'s layer identification at small scale: does CKA find the corresponding layer of another seed?

Trains one small ResNet per seed on the offline digits (8x8, no download), records every block's output on the
360 test images, and for every ordered pair of networks (A, B) and every layer of A asks which layer of B is the
most similar; the layer is *identified* when that is the same layer. Kornblith et al. (2019) report 99.3% for
linear CKA on CIFAR-10 CNNs and far less for CCA; chance is one over the number of layers.

Usage::

    python benchmarks/layer_identification.py [--arch R1111] [--widths 8,16,32] [--seeds 5]
        [--epochs 4] [--measures linear_cka,rbf_cka:0.2,rbf_cka,cca] [--rules mean,flatten] [--threads N]
        [--json PATH]

A measure is a name of `modelstitch.metrics.MEASURES`; ``rbf_cka:0.2`` is RBF CKA with a bandwidth of 0.2 of the
median distance (``threshold=0.2``), plain ``rbf_cka`` uses 1.0.

Prints one row per (width, measure, rule): top-1 and top-2 identification rates, and how many (layer, pair)
cases they are over.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import modelstitch as ms
from modelstitch import metrics, zoo
from modelstitch.metrics import flatten_features


def trained_activations(
    arch: str, width: int, seeds: list[int], epochs: float = 4
) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """One ``arch`` network per seed, trained on the digits train split; their block outputs on the test split.

    Returns:
        The layer names, and for each seed ``{layer: [360, C, H, W]}``.
    """
    train = ms.data.digits()
    x = ms.data.digits(train=False).tensors[0]
    acts, layers = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = zoo.small_resnet(arch, width=width)
        recipe = zoo.CLASSIFIER_RECIPE.replace(
            lr=0.05, batch_size=64, base_batch_size=64, epochs=epochs, channels_last=False, seed=seed
        )
        zoo.train_classifier(model, train, recipe=recipe, device="cpu", progress=False)
        layers = zoo.layer_names(model)
        with torch.no_grad():
            acts.append(ms.activations(model, x, layers))
    return layers, acts


def measure_function(spec: str) -> Callable[[Any, Any], float]:
    """``"linear_cka"`` -> `metrics.linear_cka`; ``"rbf_cka:0.2"`` -> RBF CKA with ``threshold=0.2``."""
    name, _, threshold = spec.partition(":")
    measure = metrics.MEASURES[name]
    return functools.partial(measure, threshold=float(threshold)) if threshold else measure


def identification(
    layers: list[str], acts: list[dict[str, torch.Tensor]], measure: str, rule: str
) -> tuple[float, float, int]:
    """Top-1 and top-2 rates at which a layer of A's most similar layers of B include the same layer.

    Over every ordered pair of networks and every layer; the third value is the number of cases. ``measure``
    is a `measure_function` spec.
    """
    similarity = measure_function(measure)
    top1 = top2 = total = 0
    for a, b in itertools.permutations(range(len(acts)), 2):
        fa = [flatten_features(acts[a][name], rule) for name in layers]
        fb = [flatten_features(acts[b][name], rule) for name in layers]
        sim = np.array([[similarity(u, v) for v in fb] for u in fa])
        order = np.argsort(-sim, axis=1)
        same = np.arange(len(layers))
        top1 += int((order[:, 0] == same).sum())
        top2 += int((order[:, :2] == same[:, None]).any(axis=1).sum())
        total += len(layers)
    return top1 / total, top2 / total, total


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="R1111")
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--measures", default="linear_cka,rbf_cka:0.2,rbf_cka,cca")
    parser.add_argument("--rules", default="mean,flatten")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print("| width | measure | rule | top-1 | top-2 | cases |")
    print("|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        layers, acts = trained_activations(args.arch, width, list(range(args.seeds)), args.epochs)
        for measure, rule in itertools.product(args.measures.split(","), args.rules.split(",")):
            if not measure.startswith(("linear_cka", "rbf_cka")) and rule == "flatten":
                continue  # 360 samples against thousands of features: the CCA family is degenerate there
            top1, top2, cases = identification(layers, acts, measure, rule)
            rows.append({"arch": args.arch, "width": width, "measure": measure, "rule": rule, "top1": top1,
                         "top2": top2, "cases": cases, "seeds": args.seeds, "epochs": args.epochs})  # fmt: skip
            print(f"| {width} | {measure} | {rule} | {top1:.3f} | {top2:.3f} | {cases} |", flush=True)
    if args.json:
        ms.core.write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
