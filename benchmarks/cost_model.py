"""A cost model of a stitching study: seconds from the receiver's depth after the cut, samples, epochs and cells.

Every cell of a `Study` trains its stitch for ``S`` optimiser steps (``S = ceil(E * floor(N_train / B))``,
``N_train`` the training samples left after the 15% held out, at least ``train.MIN_HOLDOUT`` or a quarter;
the model's studies pin version 0.2's default recipe, whose stitches all train the same epochs) and is
evaluated on the held-out part before training, after each epoch (and half-way through one epoch or less),
and twice on the test set. A pair's cells share the frozen forwards: the sender runs once over the
training data to fill the activation cache, the receiver once (up to its deepest cut) for the least-squares
targets, and each evaluation pass runs the sender once for all cells. On a CPU every pass of a cell (a step
or an evaluation batch) costs a fixed overhead, and one per block it runs through, besides its floating-point
work, so the model of one pair's study is

    seconds = t_study + t_cell * cells + p * P + o * sum over cells of P_c * d_j + W / R,
    W = N * F_sender + N_train * F_receiver + V * F_sender              (cache, least-squares targets, evals)
        + sum over cells of (3 * B * S + V) * (f_j + g_c)                 (steps forward and back, evals)
        + 2 * sum over cells of (N_train * l_c + s_c)                     (least squares, as float64 work)

with ``P_c = S + eval batches`` the passes of a cell and ``P`` their sum, ``d_j`` the receiver blocks after
cut ``j`` (the classifier head counts as one), ``f_j`` the suffix's forward FLOPs per sample, ``F_sender`` /
``F_receiver`` the prefixes' up to the deepest layer asked of each (counted by `torch.utils.flop_counter`),
``g_c`` the stitch's FLOPs per sample, ``l_c`` / ``s_c`` those of its least-squares accumulation per sample
and of its solve (`stitch_costs`), ``V`` the evaluated samples and ``R`` the FLOP rate. The five
coefficients are fitted by non-negative least squares on the relative error to timed studies of random-weight
small ResNets R1111 -> R1211 of width 8, 32 and 64 on the digits (random weights took 14-17% longer than
trained ones, measured by hand), one or five sender layers into one receiver layer; the model is then checked against
studies it was not fitted on (every cell of R1111 -> R1211 at width 8 and at width 64), and used to project
the ``paper`` preset (16 networks of width 64 and as many random controls on CIFAR-10's 50,000 training
images, 4 epochs at batch 256) on this CPU, and on a GPU from its FLOP term alone at a rate the user gives
(``--gpu-tflops``): a lower bound, to be replaced by a measurement.

Usage::

    python benchmarks/cost_model.py [--threads N] [--json PATH] [--gpu-tflops 100] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from torch.utils.flop_counter import FlopCounterMode

import modelstitch as ms
from modelstitch import zoo

HOLDOUT, TEST, EVAL_BATCH = 0.15, 360, 256
NETWORKS = {"A": "R1111", "B": "R1211"}


def layer_costs(blocks: str, width: int, size: int = 32) -> dict[str, tuple[int, float, float, tuple[int, int]]]:
    """``{layer: (blocks after the cut, prefix FLOPs, suffix FLOPs, (channels, side))}`` per sample, for every
    layer of a small ResNet at ``size x size`` inputs."""
    model = zoo.small_resnet(blocks, width=width).eval()
    x = torch.randn(1, 3, size, size)
    names = zoo.layer_names(model)

    def flops(module: torch.nn.Module) -> tuple[float, torch.Tensor]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = module(x)
        return float(counter.get_total_flops()), out

    total, _ = flops(model)
    costs = {}
    for k, name in enumerate(names):
        before, out = flops(ms.prefix(model, name))
        costs[name] = (len(names) - k, before, total - before, (out.shape[1], out.shape[-1]))
    return costs


def stitch_costs(provided: tuple[int, int], expected: tuple[int, int]) -> tuple[float, float, float]:
    """``(stitch forward FLOPs per sample, least-squares FLOPs per sample, solve FLOPs)`` of the linear stitch
    from a ``(channels, side)`` map to another: a ``k x k`` stride-``k`` conv when it shrinks the map (``C k²``
    inputs per output pixel), else a 1x1 conv, before a nearest upsampling when it has no more outputs than
    inputs (`make_stitch`). Least squares fits the pixels before the upsampling in any case (docs/stitches.md)."""
    (c_in, h_in), (c_out, h_out) = provided, expected
    k = max(1, h_in // h_out)
    d_in, rows = c_in * k * k, min(h_in, h_out) ** 2
    core_rows = h_out**2 if h_in < h_out and c_out > c_in else rows  # the core runs after the upsampling
    return 2.0 * core_rows * d_in * c_out, 2.0 * rows * (d_in + 1) * (d_in + 1 + c_out), (d_in + 1) ** 3 / 3


def features(
    sender: float, receiver: float, cells: list[tuple[int, float, tuple[float, float, float]]], n: int,
    epochs: float, batch: int, test: int = TEST,
) -> np.ndarray:  # fmt: skip
    """The model's five regressors for one pair's study.

    Args:
        sender: the sender prefix's FLOPs per sample, up to its deepest layer asked for.
        receiver: the receiver prefix's, up to its deepest cut.
        cells: ``(d_j, f_j, stitch_costs)`` of each cell: receiver blocks after the cut, the suffix's FLOPs per
            sample and those of its stitch.
        n: training samples (before the held-out split); test: test samples.
        epochs, batch: the stitch recipe's.
    """
    held = ms.train.holdout_size(n, HOLDOUT)
    per_epoch = max(1, (n - held) // batch)
    steps = max(1, math.ceil(epochs * per_epoch))
    # held-out evaluations: the start, after each (partial) epoch, and half-way through a schedule of one epoch
    evals = math.ceil(epochs) + 1 + int(epochs <= 1 and steps > 1)
    eval_batches = evals * math.ceil(held / EVAL_BATCH) + 2 * math.ceil(test / EVAL_BATCH)
    evaluated = evals * held + 2 * test
    passes = len(cells) * (steps + eval_batches)
    overhead = sum((steps + eval_batches) * d for d, _, _ in cells)
    work = n * sender + (n - held) * receiver + evaluated * sender  # cache, least-squares targets, evaluations
    for _, f, (g, fit, solve) in cells:
        # the fit counts twice: it was float64 work when the coefficients were fitted (float32 products since)
        work += 3 * batch * steps * (f + g) + evaluated * (f + g) + 2 * ((n - held) * fit + solve)
    return np.array([1.0, len(cells), passes, overhead, work])


def pair_features(
    a: dict[str, tuple], b: dict[str, tuple], senders: list[str], receivers: list[str], n: int, epochs: float,
    batch: int, test: int = TEST,
) -> np.ndarray:  # fmt: skip
    """`features` of the study of sender layers ``senders`` of ``a`` into ``receivers`` of ``b`` (`layer_costs`)."""
    cells = [(b[r][0], b[r][2], stitch_costs(a[s][3], b[r][3])) for s in senders for r in receivers]
    return features(max(a[s][1] for s in senders), max(b[r][1] for r in receivers), cells, n, epochs, batch, test)


def fit(x: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the *relative* squared error (short and long studies alike)."""
    return nnls(x / seconds[:, None], np.ones_like(seconds))[0]


def timed_study(
    width: int, senders: list[str], receivers: list[str], n: int, epochs: float, batch: int, data: tuple, out: Path
) -> float:  # fmt: skip
    """Seconds of one fresh `Study` of R1111 -> R1211 (random weights) over the given layers."""
    nets = {name: zoo.random_control(arch, seed=k, width=width) for k, (name, arch) in enumerate(NETWORKS.items())}
    train, test = ms.data.subset(data[0], n), data[1]
    shutil.rmtree(out, ignore_errors=True)
    # the recipe the model was fitted with (version 0.2's default): 15% held out, every stitch the same epochs
    recipe = ms.Recipe(
        lr=0.01, momentum=0.9, warmup=0.1, holdout=HOLDOUT, upsampled_epochs_factor=1, batch_size=batch,
        base_batch_size=batch, epochs=epochs,
    )  # fmt: skip
    start = time.perf_counter()
    ms.Study(
        nets, train_data=train, test_data=test, out=out, pairs=[("A", "B")], layers={"A": senders, "B": receivers},
        recipe=recipe, device="cpu", sanity=False,
    ).run(progress=False)  # fmt: skip
    return time.perf_counter() - start


def paper_preset_regressors(epochs: float = 4, batch: int = 256, n: int = 50_000, test: int = 10_000) -> np.ndarray:
    """The regressors of the ``paper`` preset: every ordered pair of the 16 networks (width 64), every layer of
    each into every layer of the other, and as many pairs of their random controls, on CIFAR-10."""
    costs = {arch: layer_costs(arch, 64) for arch in zoo.ARCHITECTURES}
    one = sum(
        pair_features(costs[a], costs[b], list(costs[a]), list(costs[b]), n, epochs, batch, test)
        for a in zoo.ARCHITECTURES
        for b in zoo.ARCHITECTURES
    )
    return 2 * one  # the controls' pairs cost as much


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="a GPU's sustained FLOP rate to project at")
    parser.add_argument("--quick", action="store_true", help="a few fits and checks only (for the tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = (ms.data.digits(train=True), ms.data.subset(ms.data.digits(train=False), TEST))
    tmp = Path(tempfile.mkdtemp(prefix="cost-model-"))
    every = zoo.layer_names(zoo.small_resnet(NETWORKS["A"], width=8))
    layouts = list(itertools.product(["stem", "layer2.0", "layer4.0"], [["layer2.0"], every]))
    grid = [(w, r, snd, size) for w in (8, 32) for r, snd in layouts for size in ((400, 1), (1000, 2))]
    grid += [(64, r, snd, (256, 1)) for r in ("stem", "layer4.0") for snd in (["layer2.0"], every)]
    checks_at = [(8, 1437, 4), (64, 512, 1)]
    if args.quick:
        grid = [(8, r, ["layer2.0"], (300, 1)) for r in ("stem", "layer4.0")]
        checks_at = [(8, 300, 1)]
    rows, checks = [], []
    try:
        for width, receiver, senders, (n, epochs) in grid:
            a, b = (layer_costs(NETWORKS[side], width) for side in "AB")
            seconds = timed_study(width, senders, [receiver], n, epochs, 64, data, tmp / "fit")
            x = pair_features(a, b, senders, [receiver], n, epochs, 64)
            rows.append({"width": width, "receiver": receiver, "cells": len(senders), "n": n, "epochs": epochs,
                         "seconds": seconds, "x": x})  # fmt: skip
            print(f"fit   width {width:2d}, {len(senders)} cell(s) into {receiver:8s} n={n:4d} epochs={epochs}: "
                  f"{seconds:6.2f} s", flush=True)  # fmt: skip
        coef = fit(np.stack([r["x"] for r in rows]), np.array([r["seconds"] for r in rows]))
        fitted = [float(r["x"] @ coef) for r in rows]
        for width, n, epochs in checks_at:  # every cell of the pair: a study the model was not fitted on
            a, b = (layer_costs(NETWORKS[side], width) for side in "AB")
            seconds = timed_study(width, every, list(b), n, epochs, 64, data, tmp / "check")
            predicted = float(pair_features(a, b, every, list(b), n, epochs, 64) @ coef)
            cells = len(every) * len(b)
            checks.append({"width": width, "n": n, "epochs": epochs, "cells": cells, "seconds": seconds,
                           "predicted": predicted, "ratio": predicted / seconds})  # fmt: skip
            print(f"check width {width:2d}, all {cells} cells, n={n}, epochs={epochs}: {seconds:.1f} s measured, "
                  f"{predicted:.1f} s predicted ({predicted / seconds:.2f})", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_study, t_cell, per_pass, overhead, per_flop = coef.tolist()
    paper = paper_preset_regressors()
    cpu_seconds = float(paper @ coef)
    gpu_seconds = float(paper[4] / (args.gpu_tflops * 1e12))
    summary = {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "coefficients": {
            "t_study_s": t_study,
            "t_cell_s": t_cell,
            "per_pass_s": per_pass,
            "overhead_per_block_step_s": overhead,
            "flop_rate_gflops": (1 / per_flop / 1e9) if per_flop > 0 else None,
        },
        "fit": [{**{k: v for k, v in r.items() if k != "x"}, "predicted": p} for r, p in zip(rows, fitted)],
        "fit_max_relative_error": max(abs(p - r["seconds"]) / r["seconds"] for r, p in zip(rows, fitted)),
        "checks": checks,
        "paper_preset": {
            "cells": int(paper[1]),
            "flops": float(paper[4]),
            "cpu_days": cpu_seconds / 86400,
            "gpu_hours_flop_bound": gpu_seconds / 3600,
            "gpu_tflops_assumed": args.gpu_tflops,
        },
    }
    print(json.dumps({k: summary[k] for k in ("coefficients", "fit_max_relative_error", "paper_preset")}, indent=1))
    if args.json:
        ms.core.write_text(args.json, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
