"""Time to accuracy: the paper's recipe from random init against faster settings, on a fixed set of cells.

For a fixed set of cells (every cell of one ordered pair of small ResNets), it trains and evaluates the cells as a
`Study` does, once with (a) the paper's recipe from random initialisation, then with each candidate (b): the
default recipe (least-squares start, best epoch on held-out data) for each candidate number of epochs, learning
rate and ``patience`` (each stitch stops once its held-out accuracy stalls), with the options the GPU path uses
(bf16 autocast, channels-last) where asked, and any other candidate recipe given with ``--candidate`` (fields of
the preset's recipe to change, e.g. ``optim=adamw,lr=0.003``). Every setting, (a) and (b), runs with the preset's
``share_suffix`` (on for both presets; ``--no-share-suffix`` turns it off); (a) runs once more without it, and the
faster of its two runs is (a)'s time (a seed mean's (a) time is scaled by the same ratio). A candidate *matches*
when every cell is at most 1 point below (a) and the mean at most 0.5 below; the report names the fastest match and
its time as a fraction of (a)'s. ``--reference-seeds`` runs (a) again with other seeds: how far (a) is from itself
(its worst cell and mean against seed 0's, and whether it "matches" by the same rule) tells how much of a
candidate's gap is the seed; ``--seeds`` does the same for the default recipe (b), which is then held to the rule
once per seed (a seed is not a candidate), and for every ``--candidate``; with both, the mean over a setting's
seeds is held to the rule against (a)'s mean over its seeds, cell by cell (``seed_means``;
``fastest_seed_mean_match`` names the fastest setting that passes, its time the mean over its seeds against (a)'s).
``--former-default`` also runs version 0.2's default recipe (least-squares start, whitened steps, momentum 0.9 at
0.01, 4 epochs, 15% held out) and reports each candidate's worst cell against it: a cell where (a) is low can
regress without (a) showing it. Peak resident memory (and, on CUDA, peak allocated memory) is recorded per setting.
Every setting is timed in a warm process: (a) runs once untimed first (``--cold`` skips that), since a process's
first study is slower whatever its recipe (docs/performance.md, "A warm process"); and, as the command line does,
with glibc's malloc told to keep freed memory (`modelstitch.core.keep_freed_memory`; ``keep_freed_memory`` in the
JSON says whether it applied).

Usage::

    python benchmarks/bench_study.py [--device cpu|cuda|auto] [--json PATH] [--data digits|cifar10]
        [--data-root DIR] [--limit N] [--pair R1111,R1211] [--epochs 0.5,1,2] [--lrs 0.01,0.05]
        [--patience 1,2] [--min-delta 0.01] [--no-share-suffix] [--fast-options] [--threads N]
        [--candidate optim=adamw,lr=0.003 ...] [--reference-seeds 1,2] [--seeds 1,2,3] [--former-default]
        [--cold]

On digits the networks are the quick preset's zoo (trained once into ``--out``); on CIFAR-10 the
``cifar-small`` preset's. ``--fast-options`` adds share_suffix, bf16 and channels-last to every candidate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _networks import preset_networks

import modelstitch as ms

FORMER_DEFAULT = {
    "lr": 0.01, "momentum": 0.9, "warmup": 0.1, "holdout": 0.15, "epochs": 4, "upsampled_epochs_factor": 1,
    "upsampled_lr_factor": 1, "batch_size": 64, "base_batch_size": 64,
}  # fmt: skip
"""Version 0.2's default recipe, as changes to the preset's (its presets quoted lr 0.01 at batch 64)."""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_setting(
    name: str, nets: dict, pair: tuple[str, str], train: Any, test: Any, recipe: ms.Recipe, out: Path, device: str,
    **study_options: Any,
) -> dict[str, Any]:  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh study: a resumed one would take no time
    start = time.perf_counter()
    study = ms.Study(
        nets, train_data=train, test_data=test, out=out / name, pairs=[pair], recipe=recipe, device=device,
        sanity=False, **study_options,
    ).run(progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    matrix = study.matrix(*pair)
    return {
        "setting": name,
        "recipe": repr(recipe),
        "recipe_seed": recipe.seed,
        "options": {k: str(v) for k, v in study_options.items()},
        "seconds": seconds,
        "cells": matrix.size,
        "accuracy": matrix.ravel().tolist(),
        "cell_names": [f"{sl} -> {rl}" for sl in study.layers[pair[0]] for rl in study.layers[pair[1]]],
        "mean_accuracy": float(matrix.mean()),
        "peak_rss_mib": _peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _matches(accuracy: np.ndarray, reference: np.ndarray) -> bool:
    """The 1-point rule: no cell more than 1 point below ``reference``, the mean at most 0.5 point below."""
    return bool((accuracy >= reference - 0.01).all() and accuracy.mean() >= reference.mean() - 0.005)


def _seed_means(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]], a_scale: float = 1.0) -> dict[str, Any]:
    """The 1-point rule on the mean over ``b_runs``' seeds against the mean over ``a_runs``', cell by cell; the time
    ratio against (a)'s mean time times ``a_scale`` (below 1 where (a) ran faster without share_suffix)."""
    a_mean = np.mean([r["accuracy"] for r in a_runs], axis=0)
    b_mean = np.mean([r["accuracy"] for r in b_runs], axis=0)
    gap = b_mean - a_mean
    return {
        "a_seeds": [r["recipe_seed"] for r in a_runs],
        "b_seeds": [r["recipe_seed"] for r in b_runs],
        "worst_cell_vs_a": float(gap.min()),
        "worst_cell": a_runs[0]["cell_names"][int(gap.argmin())],
        "mean_vs_a": float(gap.mean()),
        "matches_a": _matches(b_mean, a_mean),
        "time_ratio": float(
            np.mean([r["seconds"] for r in b_runs]) / (np.mean([r["seconds"] for r in a_runs]) * a_scale)
        ),
    }


def _recipe_changes(text: str) -> dict[str, Any]:
    """``"optim=adamw,lr=0.003"`` -> ``{"optim": "adamw", "lr": 0.003}`` (numbers, ``none``, true/false parsed)."""
    changes: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected field=value, got {item!r}")
        lowered = value.strip().lower()
        try:  # numbers and true/false as JSON reads them; anything else stays a string
            parsed: Any = None if lowered == "none" else json.loads(lowered if lowered in ("true", "false") else value)
        except json.JSONDecodeError:
            parsed = value.strip()
        changes[key.strip()] = parsed
    return changes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--limit", type=int, help="training (and test) samples")
    parser.add_argument("--pair", default="R1111,R1211")
    parser.add_argument("--layers", help="comma-separated layers of both networks (default: all)")
    parser.add_argument("--epochs", default="0.5,1,2", help="candidate epochs for (b)")
    parser.add_argument("--lrs", help="candidate learning rates for (b) (default: the preset recipe's)")
    parser.add_argument(
        "--patience", help="candidate Recipe(patience=...) values for (b), e.g. none,1,2 (default: none)"
    )
    parser.add_argument("--min-delta", type=float, help="Recipe(min_delta=...) for the candidates with a patience")
    parser.add_argument("--fast-options", action="store_true", help="share_suffix, bf16 autocast, channels-last")
    parser.add_argument(
        "--no-share-suffix", action="store_true", help="every (b) without the preset's share_suffix (what it saves)"
    )
    parser.add_argument("--out", default="runs/bench-study")
    parser.add_argument(
        "--candidate", action="append", default=[], type=_recipe_changes,
        help="another (b): fields of the preset's recipe to change, e.g. optim=adamw,lr=0.003,weight_decay=0 "
        "(repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--reference-seeds", default="", help="run (a) again with these seeds, e.g. 1,2: (a)'s own spread"
    )
    parser.add_argument(
        "--seeds", default="", help="run the default recipe (b) again with these seeds, e.g. 1,2,3: its own spread"
    )
    parser.add_argument(
        "--former-default", action="store_true", help="also run version 0.2's default and compare each (b) with it"
    )
    parser.add_argument("--cold", action="store_true", help="time (a) in a cold process (no untimed run of it first)")
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = ms.core.keep_freed_memory()  # as the command line does for every command that trains
    device = str(ms.core.resolve_device(args.device))
    out = Path(args.out)
    preset, train, test, models = preset_networks(args.data, args.data_root, args.limit, out, torch.device(device))
    pair = tuple(args.pair.split(","))
    nets = {name: models[name] for name in pair}
    paper = ms.Recipe.paper(lr=0.05, batch_size=64, base_batch_size=64, epochs=4)
    layers = {"layers": dict.fromkeys(pair, args.layers.split(","))} if args.layers else {}

    def run(name: str, recipe: ms.Recipe, **options: Any) -> dict[str, Any]:
        return run_setting(name, nets, pair, train, test, recipe, out, device, **options)

    # every setting runs as the preset's study does (share_suffix on both presets): the recipes are compared under
    # one way of running them. (a) also runs once without it, and the faster of the two is (a)'s time.
    shared = args.fast_options or (preset.share_suffix and not args.no_share_suffix)
    study_options = {"share_suffix": shared, **layers}
    warmup = None
    if not args.cold:  # a process's first study is slower, whatever its recipe: (a) once, untimed, before any timing
        warmup = run("a-paper-warmup", paper, **study_options)["seconds"]
        shutil.rmtree(out / "a-paper-warmup")
    results = [run("a-paper", paper, **study_options)]
    unshared = run("a-paper-unshared", paper, **layers) if shared else None
    for seed in [int(x) for x in args.reference_seeds.split(",") if x]:
        results.append(run(f"a-paper-seed{seed}", paper.replace(seed=seed), **study_options))
    # (b) trains every stitch all its epochs unless --patience says otherwise (the quick preset stops early)
    default = preset.recipe.replace(patience=None, min_delta=0.0)
    lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else [default.lr]
    patiences = [None if p == "none" else int(p) for p in args.patience.split(",")] if args.patience else [None]
    epoch_list = [float(e) for e in args.epochs.split(",")]
    ran: dict[str, ms.Recipe] = {}  # (b)'s grid: setting name -> recipe
    for lr, epochs, patience in itertools.product(lrs, epoch_list, patiences):
        recipe = default.replace(epochs=epochs, lr=lr, patience=patience)
        if patience is not None and args.min_delta:
            recipe = recipe.replace(min_delta=args.min_delta)
        if args.fast_options:
            recipe = recipe.replace(amp=True, channels_last=True)
        name = f"b-default-{epochs}ep" + (f"-lr{lr:g}" if args.lrs else "")
        name += f"-patience{patience}" if patience is not None else ""
        name += f"-delta{args.min_delta:g}" if patience is not None and args.min_delta else ""
        results.append(run(name, recipe, **study_options))
        ran[name] = recipe
    if args.former_default:
        recipe = default.replace(**FORMER_DEFAULT)
        results.append(run("r-default-0.2", recipe, **layers))
    candidates: list[tuple[dict[str, Any], ms.Recipe, str]] = []  # seed-0 run, recipe, prefix of its seed runs
    for changes in args.candidate:
        recipe = default.replace(**changes)
        name = ",".join(f"{k}={v}" for k, v in changes.items())
        results.append(run(f"b-{name}", recipe, **study_options))
        candidates.append((results[-1], recipe, f"s-{name}"))
    seeds = [int(x) for x in args.seeds.split(",") if x]
    # each setting with seeds: its seed-0 run, then one run per seed ("s-" runs are not candidates themselves)
    with_seeds: dict[str, list[dict[str, Any]]] = {}
    if seeds:  # the default at seed 0 (run above when --epochs and --lrs include its own), then at each seed
        same = [r for r in results if ran.get(r["setting"]) == default]
        own = same[0] if same else run("s-default-seed0", default, **study_options)
        if not same:
            results.append(own)
        for first, recipe, prefix in [(own, default, "s-default"), *candidates]:
            later = [run(f"{prefix}-seed{seed}", recipe.replace(seed=seed), **study_options) for seed in seeds]
            with_seeds[first["setting"]] = [first, *later]
        results += [r for runs in with_seeds.values() for r in runs[1:]]
    base = np.array(results[0]["accuracy"])
    # (a)'s time: the faster of its runs with and without share_suffix (its cells are the same either way)
    a_seconds = results[0]["seconds"] if unshared is None else min(results[0]["seconds"], unshared["seconds"])
    for r in results[1:]:
        acc = np.array(r["accuracy"])
        r["worst_cell_vs_a"] = float((acc - base).min())
        r["worst_cell"] = r["cell_names"][int((acc - base).argmin())]
        r["mean_vs_a"] = float(acc.mean() - base.mean())
        r["matches_a"] = _matches(acc, base)
        r["time_ratio"] = r["seconds"] / a_seconds
    seed_runs = with_seeds[own["setting"]][1:] if seeds else []
    for r in seed_runs:
        gap = np.array(r["accuracy"]) - np.array(own["accuracy"])
        r["worst_cell_vs_default"] = float(gap.min())
        r["worst_cell_vs_default_name"] = r["cell_names"][int(gap.argmin())]
        r["mean_vs_default"] = float(gap.mean())
    former = next((r for r in results if r["setting"] == "r-default-0.2"), None)
    for r in results[1:] if former is not None else []:
        gap = np.array(r["accuracy"]) - np.array(former["accuracy"])
        r["worst_cell_vs_former"] = float(gap.min())
        r["worst_cell_vs_former_name"] = r["cell_names"][int(gap.argmin())]
    matches = [r for r in results[1:] if r["matches_a"] and r["setting"].startswith("b-")]
    fastest = min(matches, key=lambda r: r["seconds"]) if matches else None
    # (a) against itself: a candidate no further below (a) than (a) with another seed is within the seed's spread
    references = [r for r in results[1:] if r["setting"].startswith("a-")]
    spread = min((r["worst_cell_vs_a"] for r in references), default=None)
    within = [
        r for r in results[1:]
        if spread is not None and r["setting"].startswith("b-") and r["worst_cell_vs_a"] >= spread
        and r["mean_vs_a"] >= -0.005
    ]  # fmt: skip
    fastest_within = min(within, key=lambda r: r["seconds"]) if within else None
    # each setting's seeds against (a)'s, cell by cell on their means: the 1-point rule with less of the draw in it
    all_means = {}
    if references:
        scale = a_seconds / results[0]["seconds"]
        all_means = {name: _seed_means([results[0], *references], runs, scale) for name, runs in with_seeds.items()}
    seed_means = all_means.get(own["setting"]) if seeds else None
    mean_matches = [name for name, m in all_means.items() if m["matches_a"]]
    fastest_mean = min(mean_matches, key=lambda name: all_means[name]["time_ratio"]) if mean_matches else None
    columns = ["seconds", "mean accuracy", "worst cell vs (a)", "worst cell", "mean vs (a)", "matches (a)"]
    columns.append("time / (a)")
    columns += ["worst cell vs 0.2's default", "that cell"] if former is not None else []
    print("| setting | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in results:
        if r is results[0]:
            extra = ["-", "-", "-", "-", f"{r['seconds'] / a_seconds:.2f}"]
        else:
            extra = [f"{r['worst_cell_vs_a']:+.3f}", r["worst_cell"], f"{r['mean_vs_a']:+.3f}", str(r["matches_a"])]
            extra.append(f"{r['time_ratio']:.2f}")
        if former is not None:
            gap = "-" if r is results[0] else f"{r['worst_cell_vs_former']:+.3f}"
            extra += [gap, "-" if r is results[0] else r["worst_cell_vs_former_name"]]
        print(f"| {r['setting']} | {r['seconds']:.1f} | {r['mean_accuracy']:.3f} | " + " | ".join(extra) + " |")
    summary = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pair": list(pair),
        "warmup_seconds": warmup,
        "keep_freed_memory": allocator,
        "results": results,
        "a_unshared": unshared,
        "a_seconds": a_seconds,
        "fastest_match": None if fastest is None else fastest["setting"],
        "fastest_time_ratio": None if fastest is None else fastest["time_ratio"],
        "reference_worst_cell": spread,
        "fastest_within_seed_spread": None if fastest_within is None else fastest_within["setting"],
        "fastest_within_seed_spread_time_ratio": None if fastest_within is None else fastest_within["time_ratio"],
        "default_seed_spread": min((r["worst_cell_vs_default"] for r in seed_runs), default=None),
        "default_matches_by_seed": {str(r["recipe_seed"]): r["matches_a"] for r in [own, *seed_runs]} if seeds else {},
        "default_seed_means": seed_means,
        "seed_means": all_means,
        "fastest_seed_mean_match": fastest_mean,
        "fastest_seed_mean_match_time_ratio": None if fastest_mean is None else all_means[fastest_mean]["time_ratio"],
    }
    if unshared is not None:
        unshared_gap = float(np.abs(np.array(unshared["accuracy"]) - base).max())
        print(
            f"(a) without share_suffix: {unshared['seconds']:.1f} s against {results[0]['seconds']:.1f} s with it (its "
            f"cells within {unshared_gap:.4f}); (a)'s time is the faster, {a_seconds:.1f} s"
        )
    print("fastest setting that matches (a):", summary["fastest_match"], "time ratio", summary["fastest_time_ratio"])
    if spread is not None:
        print(
            f"(a) with another seed: worst cell {spread:+.3f} against seed 0; fastest (b) within that spread:",
            summary["fastest_within_seed_spread"],
            "time ratio",
            summary["fastest_within_seed_spread_time_ratio"],
        )
    if seeds:
        print(
            f"the default (b) with another seed: worst cell {summary['default_seed_spread']:+.3f} against its seed 0; "
            "matches (a) by seed:",
            summary["default_matches_by_seed"],
        )
    for name, m in all_means.items():
        print(
            f"{name}, mean over seeds {m['b_seeds']} against (a)'s over {m['a_seeds']}: worst cell "
            f"{m['worst_cell_vs_a']:+.3f} ({m['worst_cell']}), mean {m['mean_vs_a']:+.3f}, matches: {m['matches_a']}, "
            f"time / (a) {m['time_ratio']:.2f}"
        )
    if all_means:
        ratio = summary["fastest_seed_mean_match_time_ratio"]
        print("fastest setting whose seed mean matches (a)'s:", fastest_mean, "time ratio", ratio)
    if args.json:
        ms.core.write_text(args.json, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
