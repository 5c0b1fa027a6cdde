"""Do stitches find the solution when one exists? Per-cell accuracy under the paper's recipe and the default one.

On the quick preset's networks (R1111 and R1211 at width 8, trained on the bundled digits as the preset trains
them), every cell of the self-pair R1111 -> R1111 (the diagonal has an exact solution: the identity) and of
R1111 -> R1211 is trained three ways:

- ``paper``: the paper's recipe at the quick preset's old learning rate (``Recipe.paper(lr=0.05, batch 64)``):
  random init, 4 epochs, the last epoch kept; what the quick preset ran in version 0.1.
- ``lstsq``: the least-squares fit alone, no training (the default run's ``init_accuracy``, which it asks
  for with ``Study(score_start=True)``).
- ``plain``: the quick preset's recipe with plain SGD steps (``precondition=False``).
- ``default``: the quick preset's recipe, the default ``Recipe()``: least-squares init, SGD steps whitened by
  the stitch input's second moments, three quarters of an epoch (one and a half for a stitch that upsamples by
  4 or more), the state with the best accuracy on the training data held out.

It prints a Markdown table (one row per cell) with summary rows, the seconds each setting took, and the
training-loss curves of the self-stitch cells, and writes them to ``--json`` and a figure to ``--figure``.

Usage::

    python benchmarks/self_stitch.py [--out DIR] [--json PATH] [--figure PATH] [--threads N] [--seeds 0,1,2]

``--seeds`` reruns the study seed (stitch init, data order and held-out split) for the seed-to-seed spread of
each cell (``--layers stem,layer1.0,layer2.0`` keeps it to a few cells).
``--steps-sweep 0.25,0.5,1,2,4,8`` instead trains R1111 -> R1211 with the default recipe for each number of
epochs and prints the mean and minimum cell accuracy against the optimiser steps (the measurement behind
``MIN_STEPS``, the threshold of the too-few-steps warning).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import modelstitch as ms
from modelstitch import data
from modelstitch.study import PRESETS, zoo_models

PAIRS = [("R1111", "R1111"), ("R1111", "R1211")]


def full_epochs() -> ms.Recipe:
    """The quick preset's stitch recipe with every stitch trained all its epochs (the preset itself stops early)."""
    return PRESETS["quick"].recipe.replace(patience=None, min_delta=0.0)


def settings() -> dict[str, ms.Recipe]:
    quick = full_epochs()
    return {
        "paper": ms.Recipe.paper(lr=0.05, batch_size=64, base_batch_size=64, epochs=4),
        "plain": quick.replace(precondition=False),
        "default": quick,
    }


def run(out: Path, seeds: list[int], layers: list[str] | None = None) -> dict[str, Any]:
    cpu = torch.device("cpu")
    preset = PRESETS["quick"]
    models, _ = zoo_models(
        preset, out=out, train_data=data.digits(), test_data=data.digits(train=False), seed=0, device=cpu,
        progress=False,
    )  # fmt: skip
    nets = {name: models[name] for name in ("R1111", "R1211")}
    own = {name: ms.evaluate(net, data.digits(train=False), device=cpu)["accuracy"] for name, net in nets.items()}
    result: dict[str, Any] = {"network_accuracy": own, "cells": {}, "seconds": {}, "curves": {}}
    for seed in seeds:
        for name, recipe in settings().items():
            start = time.perf_counter()
            study = ms.Study(
                nets,
                train_data=data.digits(),
                test_data=data.digits(train=False),
                out=out / f"{name}-seed{seed}",
                pairs=PAIRS,
                recipe=recipe.replace(seed=seed),
                seed=seed,
                device=cpu,
                sanity=False,
                score_start=name == "default",
                layers=None if layers is None else dict.fromkeys(nets, layers),
            ).run(progress=False)
            result["seconds"][f"{name}/seed{seed}"] = time.perf_counter() - start
            for row in study.rows():
                key = f"{row['sender']}:{row['sender_layer']}->{row['receiver']}:{row['receiver_layer']}"
                cell = result["cells"].setdefault(key, {})
                cell.setdefault(name, []).append(row["accuracy"])
                if name == "default":
                    cell.setdefault("lstsq", []).append(row["init_accuracy"])
        if seed == seeds[0] and layers is None:
            result["curves"] = self_stitch_curves(nets["R1111"], seed)
    return result


def self_stitch_curves(net: torch.nn.Module, seed: int) -> dict[str, dict[str, list[float]]]:
    """Training loss per epoch of each self-stitch under both settings (the same cells as the study's)."""
    curves: dict[str, dict[str, list[float]]] = {}
    layers = ms.zoo.layer_names(net)
    example = data.digits()[0][0][None]
    for name, recipe in settings().items():
        models = []
        for layer in layers:
            torch.manual_seed(ms.study.Cell("R1111", layer, "R1111", layer).seed(seed))
            models.append(ms.stitch(net, layer, net, layer, example_input=example))
        train, held = ms.train.holdout_split(data.digits(), recipe.holdout, seed=seed)
        if recipe.init == "lstsq":
            ms.train.fit_least_squares_all(models, train, device="cpu")
        results = ms.train_stitches(
            models, train, holdout=held, recipe=recipe.replace(seed=seed), cache=True, device="cpu", progress=False
        )
        curves[name] = {layer: r.epoch_losses for layer, r in zip(layers, results)}
    return curves


def steps_sweep(out: Path, epochs: list[float]) -> list[dict[str, float]]:
    """Mean and minimum accuracy over the cells of R1111 -> R1211 for each training length (default recipe)."""
    cpu = torch.device("cpu")
    models, _ = zoo_models(
        PRESETS["quick"], out=out, train_data=data.digits(), test_data=data.digits(train=False), seed=0, device=cpu,
        progress=False,
    )  # fmt: skip
    nets = {name: models[name] for name in ("R1111", "R1211")}
    rows = []
    for e in epochs:
        study = ms.Study(
            nets,
            train_data=data.digits(),
            test_data=data.digits(train=False),
            out=out / f"sweep-{e}",
            pairs=[("R1111", "R1211")],
            recipe=full_epochs().replace(epochs=e),
            device=cpu,
            sanity=False,
        ).run(progress=False)
        matrix = study.matrix("R1111", "R1211")
        train_part = len(ms.train.holdout_split(data.digits(), study.recipe.holdout, seed=0)[0])
        steps = ms.train.total_steps(e, train_part // study.recipe.batch_size)
        rows.append({"epochs": e, "steps": steps, "mean": float(matrix.mean()), "min": float(matrix.min())})
        print(f"| {e} | {steps} | {matrix.mean():.3f} | {matrix.min():.3f} |", flush=True)
    return rows


def table(result: dict[str, Any]) -> str:
    names = ["paper", "lstsq", "plain", "default"]
    lines = ["| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, cell in result["cells"].items():
        values = [_fmt(cell[n]) for n in names]
        lines.append(f"| {key}{' (self)' if _is_self(key) else ''} | " + " | ".join(values) + " |")
    for pair in (f"{a}->{b}" for a, b in PAIRS):
        cells = {k: v for k, v in result["cells"].items() if _pair(k) == pair}
        means = [np.mean([np.mean(v[n]) for v in cells.values()]) for n in names]
        lines.append(f"| mean {pair} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    own = result["network_accuracy"]["R1111"]
    selfs = {k: v for k, v in result["cells"].items() if _is_self(k)}
    floors = [min(np.min(v[n]) for v in selfs.values()) - own for n in names]
    lines.append("| self-stitch floor (min - network) | " + " | ".join(f"{f:+.3f}" for f in floors) + " |")
    base = {k: np.mean(v["paper"]) for k, v in result["cells"].items()}
    worse = [sum(np.mean(v[n]) < base[k] - 0.02 for k, v in result["cells"].items()) for n in names]
    lines.append("| cells > 2 points below `paper` | " + " | ".join(str(w) for w in worse) + " |")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def _pair(key: str) -> str:
    sender, receiver = key.split("->")
    return f"{sender.split(':')[0]}->{receiver.split(':')[0]}"


def _is_self(key: str) -> bool:
    sender, receiver = key.split("->")
    return sender == receiver


def figure(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(result["curves"]), sharey=True)
    for ax, (name, curves) in zip(axes, result["curves"].items()):
        for layer, losses in curves.items():
            ax.plot(range(1, len(losses) + 1), losses, marker="o", label=layer)
        epochs = max(len(losses) for losses in curves.values())
        ax.set(title=f"R1111 self-stitches, {name}", xlabel="epoch", yscale="log", xticks=range(1, epochs + 1))
        ax.axhline(np.log(10), color="grey", ls=":", lw=1)
    axes[0].set_ylabel("training loss (dotted: chance)")
    axes[1].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/self-stitch", help="run folder (zoo and studies)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--figure", help="write the self-stitch loss curves here (PNG)")
    parser.add_argument("--seeds", default="0", help="comma-separated study seeds")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--steps-sweep", help="comma-separated epochs: accuracy against optimiser steps instead")
    parser.add_argument("--layers", help="comma-separated layers of both networks (default: all; the curves need all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps_sweep:
        print("| epochs | steps | mean accuracy | min accuracy |\n|---|---|---|---|")
        rows = steps_sweep(Path(args.out), [float(e) for e in args.steps_sweep.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return {"sweep": rows}
    layers = args.layers.split(",") if args.layers else None
    result = run(Path(args.out), [int(s) for s in args.seeds.split(",")], layers)
    print(table(result))
    print("network accuracy:", {k: round(v, 3) for k, v in result["network_accuracy"].items()})
    print("seconds:", {k: round(v, 1) for k, v in result["seconds"].items()})
    if args.json:
        ms.core.write_text(args.json, json.dumps(result, indent=1))
    if args.figure and result["curves"]:
        figure(result, Path(args.figure))
    return result


if __name__ == "__main__":
    main()
