"""The ``modelstitch`` command line: the same functions as the Python API.

modelstitch layers resnet18
modelstitch zoo train R1211 --data digits --epochs 4 --out zoo/
modelstitch study run --preset quick --out runs/quick
modelstitch study plot runs/quick
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import StitchError

if TYPE_CHECKING:
    from .core import Allowed

__all__ = ["main"]


def _layers(args: argparse.Namespace) -> None:
    import torch

    from . import zoo
    from .core import layer_specs

    model = _build_model(args.model, args.num_classes)
    input_size = args.input_size or _input_size(model)
    specs = layer_specs(model, torch.randn(1, *input_size))
    paper = set()
    with contextlib.suppress(StitchError):
        paper = set(zoo.layer_names(model))
    width = max(len(s.name) for s in specs)
    for s in specs:
        mark = "  *" if s.name in paper else ""
        calls = f"  (runs {s.calls}x)" if s.calls > 1 else ""
        print(f"{s.name:<{width}}  {s.layout or '-':<6}  {s.shape}{calls}{mark}")
    if paper:
        print("\n* the paper's layer indices 0..N (zoo.layer_names)")


def _build_model(name: str, num_classes: int):
    from . import zoo

    if name.endswith(".safetensors"):
        return zoo.load_model(name)
    try:
        zoo.parse_blocks(name)
        return zoo.small_resnet(name, num_classes=num_classes)
    except StitchError:
        pass
    import torchvision

    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, num_classes=num_classes)
    import timm

    if timm.is_model(name):
        return timm.create_model(name, num_classes=num_classes, pretrained=False)
    raise StitchError(f"unknown model {name!r}: give a small ResNet (R1211), a torchvision or a timm model name")


def _input_size(model) -> tuple[int, ...]:
    """C H W of one input: timm's ``pretrained_cfg["input_size"]`` when the model has one, else 3 x 32 x 32."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 32, 32)


def _zoo_train(args: argparse.Namespace) -> None:
    from . import zoo
    from .core import resolve_device
    from .study import load_dataset

    zoo.parse_blocks(args.architecture)  # a bad name fails before the data loads
    _check_data_flags(args)
    device = resolve_device(args.device)
    recipe = zoo.CLASSIFIER_RECIPE.replace(seed=args.seed, **({} if args.epochs is None else {"epochs": args.epochs}))
    train = load_dataset(args.data, train=True, root=args.data_root, augment=True, download=args.download)
    test = load_dataset(args.data, train=False, root=args.data_root, download=args.download)
    from .data import subset

    train, test = subset(train, args.limit, seed=args.seed), subset(test, args.limit, seed=args.seed)
    model = zoo.small_resnet(args.architecture, width=args.width)
    result = zoo.train_classifier(model, train, recipe=recipe, test_data=test, device=device, progress=not args.quiet)
    path = Path(args.out) / f"{zoo.architecture_name(args.architecture)}.safetensors"
    zoo.save_model(path, model, dataset=args.data, test_accuracy=result["test_accuracy"], seed=args.seed)
    print(f"{zoo.architecture_name(args.architecture)}: test accuracy {result['test_accuracy']:.4f}; saved {path}")


def _study_run(args: argparse.Namespace) -> int:
    from .study import PresetOptions, run_preset, study_from_file

    start = time.perf_counter()
    run_options = {
        "executor": args.executor,
        "address": args.address,
        "retry_failed": args.retry_failed,
        "keep_going": args.keep_going,
        "wait": args.wait,
    }
    if args.address is not None and args.executor != "ray":
        raise StitchError(f"--address {args.address} is a Ray cluster's: add --executor ray, or drop --address")
    if args.config:
        given = _preset_flags_given(args)
        if given:
            raise StitchError(
                f"{given[0]} is an option of presets, which --config does not read: set it in the study file "
                f"{args.config} (docs/study.md)"
            )
        study = study_from_file(args.config, out=args.out, device=args.device, progress=not args.quiet)
        study.run(progress=not args.quiet, **run_options)  # writes cells.csv too
        study.plot()
        if len(study.measures) > 1:
            study.plot_measures()
        return _report(study, time.perf_counter() - start)

    options = PresetOptions(  # checks every option before anything runs
        data_root=args.data_root,
        download=args.download,
        seed=0 if args.seed is None else args.seed,
        limit=args.limit,
        epochs=args.epochs,
        max_pairs=args.max_pairs,
        measures=_measures(args.measures or ("stitch",)),
        width=args.width,
        batch_size=args.batch_size,
        init=args.init,
        patience=args.patience,
        min_delta=args.min_delta,
        paper_recipe=args.paper_recipe,
        precision=args.precision,
        memory_budget=None if args.memory_budget is None else int(args.memory_budget * 1024**3),
    )
    preset = args.preset or "quick"
    study = run_preset(
        preset,
        out=args.out or f"runs/{preset}",
        options=options,
        device=args.device,
        progress=not args.quiet,
        run_options=run_options,
    )
    return _report(study, time.perf_counter() - start)


def _report(study: Any, seconds: float) -> int:
    rows, out = study.rows(), study.out
    print(
        f"{len(rows)} cells in {study.store_path}; table {out / 'cells.csv'}; heatmaps {out / 'heatmaps.png'} "
        f"({_duration(seconds)}, networks and figures included)"
    )
    for name, s in study.results.self_stitch().items():
        verdict = "FAILED: low cells may mean 'not found', see docs/trust.md" if s["failed"] else "ok"
        print(
            f"self-stitch check {name}: own accuracy {s['accuracy']:.3f}, self-stitch floor {s['floor']:+.3f} "
            f"(at {s['worst_layer']}): {verdict}"
        )
    from .study._results import UNDERTRAINED

    flagged = collections.Counter(r["convergence"] for r in rows if r["convergence"] in UNDERTRAINED)
    if flagged:
        print(
            f"{sum(flagged.values())} cells may be under-trained ({flagged['start']} kept their start, "
            f"{flagged['rising']} still rising at their last held-out check; column convergence, dashed orange "
            "on the heatmaps)"
        )
    failures = study.failures()
    for f in failures:
        print(
            f"failed after {f['attempts']} attempt(s): {f['sender']} -> {f['receiver']}: {f['error'].splitlines()[-1]}"
        )
    if failures:
        print(f"{len(failures)} pair(s) failed; rerun with --retry-failed to try them again", file=sys.stderr)
        return 1
    return 0


def _duration(seconds: float) -> str:
    """``"1 min 49 s"`` or ``"42 s"``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


_PRESET_FLAGS = {
    "--preset": "preset",
    "--data-root": "data_root",
    "--download": "download",
    "--seed": "seed",
    "--limit": "limit",
    "--epochs": "epochs",
    "--max-pairs": "max_pairs",
    "--width": "width",
    "--batch-size": "batch_size",
    "--init": "init",
    "--patience": "patience",
    "--min-delta": "min_delta",
    "--paper-recipe": "paper_recipe",
    "--precision": "precision",
    "--memory-budget": "memory_budget",
    "--measures": "measures",
}
"""The ``study run`` flags that set up a preset (their defaults are None or False), by their argparse names."""


def _check_data_flags(args: argparse.Namespace) -> None:
    """Refuse --data-root and --download where --data digits (bundled) reads neither."""
    download = getattr(args, "download", False)
    if args.data == "digits" and (args.data_root is not None or download):
        flag = "--data-root" if args.data_root is not None else "--download"
        raise StitchError(f"--data digits is bundled and reads no {flag}; drop it, or use --data cifar10")


def _preset_flags_given(args: argparse.Namespace) -> list[str]:
    """The flags of `_PRESET_FLAGS` this command line gives."""
    given = []
    for flag, dest in _PRESET_FLAGS.items():
        value = getattr(args, dest)
        if value is not None and value is not False:
            given.append(flag)
    return given


def _measures(names: Sequence[str]) -> tuple[str, ...]:
    """``("cka",)`` -> ``("stitch", "cka")``; stitching is always part of a study run."""
    return ("stitch", *(n for n in names if n != "stitch"))


def _compare(args: argparse.Namespace) -> None:
    import csv
    import io

    from . import zoo
    from .core import resolve_device, write_text
    from .data import subset
    from .metrics import compare_layers
    from .study import load_dataset
    from .study._plot import Panel, plot_heatmaps

    _check_data_flags(args)
    device = resolve_device(args.device)
    data = load_dataset(args.data, train=False, root=args.data_root)
    data = subset(data, args.limit, seed=args.seed)
    example = data[0][0].unsqueeze(0)  # one input like the data, for listing the layers
    nets, layers = {}, {}
    for side, name, given in (("A", args.a, args.layers_a), ("B", args.b, args.layers_b)):
        nets[side] = _build_model(name, args.num_classes).eval()
        if given is not None:
            layers[side] = _matching_layers(nets[side], given, example, f"--layers-{side.lower()}", name)
        else:
            try:
                layers[side] = zoo.layer_names(nets[side])
            except StitchError:
                raise StitchError(
                    f"{name}: pass --layers-{side.lower()} name,name,... , a pattern such as 'layer*.0', or all "
                    f"(modelstitch layers {name} lists them)"
                ) from None
    matrices = compare_layers(
        nets["A"], layers["A"], nets["B"], layers["B"], data, measures=args.measures, rule=args.rule, device=device
    )
    out = Path(args.out)
    rows = [
        {"measure": m, "layer_a": la, "layer_b": lb, "value": float(matrix[i, j])}
        for m, matrix in matrices.items()
        for i, la in enumerate(layers["A"])
        for j, lb in enumerate(layers["B"])
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["measure", "layer_a", "layer_b", "value"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "compare.csv", buffer.getvalue())
    panels = [
        Panel(
            title=m,
            matrix=matrix,
            sender_labels=[f"{i} {n}" for i, n in enumerate(layers["A"])],
            receiver_labels=[f"{j} {n}" for j, n in enumerate(layers["B"])],
            sender_name=f"A {args.a}",
            receiver_name=f"B {args.b}",
        )
        for m, matrix in matrices.items()
    ]
    plot_heatmaps(panels, out / "compare", suptitle=f"{args.a} vs {args.b} on {args.data}", label="similarity")
    for m, matrix in matrices.items():
        print(f"{m}: {matrix.shape[0]} x {matrix.shape[1]} layers, values {matrix.min():.3f} to {matrix.max():.3f}")
    print(f"wrote {out / 'compare.csv'} and {out / 'compare.png'}")


def _matching_layers(model: Any, given: Sequence[str], example: Any, flag: str, name: str) -> list[str]:
    """The layers ``given`` names: ``all``, exact names, and patterns (``layer*.0``, see `_layer_matches`).

    The listing is that of ``modelstitch layers`` (`modelstitch.layer_specs`: ``"input"`` first, then every
    module whose output holds a tensor, in execution order, ``"name:k"`` for a module that runs more than
    once). ``all`` gives every layer of it, a pattern the layers it matches, in its order; an exact name is
    passed on as given (and checked where it is used); a layer named twice counts once.

    Args:
        model: the network.
        given: the comma-separated items of ``flag``.
        example: one input batch like the data, to probe the layers with.
        flag: the option, for messages (``"--layers-a"``).
        name: the model as given on the command line, for messages.

    Raises:
        StitchError: a pattern matches no layer (the message names it and the closest layer names).
    """
    import difflib

    from .core import layer_specs

    listing = [spec.name for spec in layer_specs(model, example)]
    out: list[str] = []
    for item in given:
        if item == "all":
            out += listing
        elif not any(c in item for c in "*?["):
            out.append(item)
        else:
            matched = [layer for layer in listing if _layer_matches(item, layer)]
            if not matched:
                close = difflib.get_close_matches(item, listing, n=5, cutoff=0.4)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise StitchError(
                    f"{flag} {item!r} matches no layer of {name}{hint} (modelstitch layers {name} lists them all)"
                )
            out += matched
    return list(dict.fromkeys(out))


def _layer_matches(pattern: str, name: str) -> bool:
    """Whether a dotted layer ``name`` matches a shell-style ``pattern``, part by part.

    Each dot-separated part of the pattern is an `fnmatch` pattern for one part of the name, so ``*`` stays
    within a part: ``layer*.0`` matches ``layer1.0`` but not ``layer2.0.downsample.0``. A part ``**`` spans
    any number of parts: ``layer1.**`` matches ``layer1`` and everything inside it.

    >>> [n for n in ["layer1.0", "layer2.0.downsample.0", "layer2.0.conv1"] if _layer_matches("layer*.0", n)]
    ['layer1.0']
    """

    def match(parts: list[str], names: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(parts[1:], names[k:]) for k in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and match(parts[1:], names[1:])

    return match(pattern.split("."), name.split("."))


def _study_plot(args: argparse.Namespace) -> None:
    from .study import StudyResults

    results = StudyResults.open(args.run_dir)
    path = results.out / "heatmaps"
    results.plot(path, diagonal=args.diagonal)
    results.to_csv()
    print(f"heatmaps {path.with_suffix('.png')} and .svg; table {results.out / 'cells.csv'}")
    if args.grid:
        results.plot_grid(results.out / "grid")
        print(f"grid of all pairs {results.out / 'grid.png'}")


def _study_analyze(args: argparse.Namespace) -> None:
    from . import analysis
    from .study import StudyResults, open_preset_study, read_run_meta, study_from_file

    progress = not args.quiet
    images = [tuple(args.image_pair)] if args.image_pair else ([] if args.no_images else None)
    if args.config is not None:  # the TOML file rebuilds the networks and data: every analysis
        study: Any = study_from_file(args.config, out=args.run_dir, device=args.device, progress=progress)
    elif read_run_meta(args.run_dir, "preset") is not None:
        study = open_preset_study(args.run_dir, device=args.device, progress=progress)
    else:  # made in Python (or from a TOML file not given): what the store holds
        study = StudyResults.open(args.run_dir)
        flags = (("--mse-epochs", args.mse_epochs), ("--image-pair", args.image_pair))
        given = [flag for flag, value in flags if value]
        if given:
            raise StitchError(
                f"{given[0]} needs the study's networks and data, and {args.run_dir} is not a preset's run folder: "
                "for a study from a TOML file add --config FILE; for one made in Python call "
                "modelstitch.analysis.analyze(study) there; or drop the flag"
            )
        print(f"{args.run_dir} was not made from a preset: analysing its stored cells only (see 'skipped' below)")
    if isinstance(study, StudyResults):
        result = analysis.analyze(study)
    else:
        mse_recipe = None if args.mse_epochs is None else study.recipe.replace(epochs=args.mse_epochs)
        result = analysis.analyze(study, mse_recipe=mse_recipe, images=images, progress=progress)
    overall = result["triangle"]["overall"]
    for name, floor in result["triangle"]["self_stitch_floor"].items():
        print(f"self-stitch floor {name}: {floor:+.3f} (min over layers of self-stitch - network accuracy)")
    excluded = result["triangle"].get("excluded_sanity_cells", 0)
    if excluded:
        print(
            f"{excluded} self-stitch cells the study added as its sanity check are left out of the means and "
            "correlations below (they are the self-stitch floor above)"
        )
    triangles = [("accuracy", overall)]
    if "triangle_accuracy" in result:  # language models: the triangle is of loss recovered, then of accuracy
        triangles = [("loss recovered", overall), ("accuracy", result["triangle_accuracy"]["overall"])]
    for value, sides_of in triangles:
        for kind, s in sides_of.items():
            if s["n_lower"] + s["n_upper"] == 0:  # e.g. no control pairs
                continue
            sides = f"{s['lower']:.3f} on or below j/J = i/I, {s['upper']:.3f} above"
            print(f"{kind}: mean {value} {sides} (gap {s['gap']:+.3f})")
    for skipped in result["skipped"]:
        print(f"skipped: {skipped}")
    for c in result["correlations"]:
        if c["cells"] == 0 and not c.get("excluded_sanity_cells"):  # e.g. no control pairs
            continue
        score = "loss recovered" if "triangle_accuracy" in result else "stitching"
        left = c.get("excluded_sanity_cells", 0)
        note = f" ({left} self-stitch sanity cells left out)" if left else ""
        print(
            f"{c['measure']} vs {score}, {c['pairs']} pairs: Spearman {c['spearman']:+.3f} over {c['cells']} cells"
            + note
        )
    print("wrote " + ", ".join(str(f) for f in result["files"]))


def _typed(allowed: Allowed) -> Callable[[str], Any]:
    """An argparse ``type=``: the text read as ``allowed`` says, refused (exit status 2) when not allowed."""

    def parse(text: str) -> Any:
        try:
            return allowed.parse(text)
        except StitchError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _listed(check: Callable[[list[str], str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` for ``"a,b,c"``: the names, checked by ``check(names, what)`` (exit status 2)."""

    def parse(text: str) -> Any:
        names = [n.strip() for n in text.split(",") if n.strip()]
        try:
            return check(names, repr(text))
        except StitchError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .core import check_names, integer, number
    from .metrics import LAYER_MEASURES, LAYER_RULES
    from .study._presets import PRESETS, check_measures

    count, positive = _typed(integer(1)), _typed(number(above=0))
    layer_names = _listed(lambda names, what: check_names(names, what, noun="layer", example="stem,layer1.0"))

    parser = argparse.ArgumentParser(prog="modelstitch", description="Model stitching studies from the command line.")
    parser.add_argument("--version", action="version", version=f"modelstitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    layers = commands.add_parser("layers", help="list a model's layers and their output shapes")
    layers.add_argument("model", help="a small ResNet (R1211), a torchvision name (resnet18) or a timm name")
    layers.add_argument(
        "--input-size",
        type=count,
        nargs=3,
        metavar=("C", "H", "W"),
        help="C H W of one input (default: timm's input size, else 3 32 32)",
    )
    layers.add_argument("--num-classes", type=count, default=10)
    layers.set_defaults(func=_layers)

    compare = commands.add_parser(
        "compare",
        help="similarity measures (CKA, PWCCA, ...) between every layer of two networks, no training",
        description="Similarity measures between the layers of two networks, on the test split of --data. A "
        ".safetensors zoo file (a small ResNet saved by zoo.save_model) gives its trained weights; a bare model "
        "name (R1211, resnet18, a timm name) builds that architecture with random (untrained) weights: no "
        "pretrained weights are downloaded (for those, call modelstitch.metrics.compare_layers in Python).",
    )
    compare.add_argument(
        "a",
        help="a .safetensors zoo file (a trained small ResNet), or a small ResNet (R1211), torchvision or timm "
        "name: a bare name means random (untrained) weights",
    )
    compare.add_argument("b", help="the second network, as for A (a bare name: random weights)")
    compare.add_argument("--data", choices=["digits", "cifar10"], default="digits", help="the test split is used")
    compare.add_argument("--data-root", help="CIFAR-10 folder (image folders train/ test/, or torchvision's)")
    compare.add_argument(
        "--measures",
        type=_listed(lambda names, what: check_measures(names, what, LAYER_MEASURES)),
        default=("cka",),
        help=f"comma-separated, e.g. cka,pwcca,procrustes ({', '.join(LAYER_MEASURES)})",
    )
    compare.add_argument(
        "--rule",
        choices=LAYER_RULES,
        help="how maps become vectors: flatten, mean, cls, last, or positions (each token a sample); default: "
        "flatten for CKA, mean otherwise",
    )
    layers_help = (
        "comma-separated layer names or patterns such as 'layer*.0' ('*' stays within one part of a dotted name, "
        "'**' spans parts), matched against the names `modelstitch layers` prints; or all (every one of them)"
    )
    compare.add_argument(
        "--layers-a", type=layer_names, help=f"layers of A: {layers_help} (default: a ResNet's paper layers)"
    )
    compare.add_argument("--layers-b", type=layer_names, help="layers of B, as for --layers-a")
    compare.add_argument("--num-classes", type=count, default=10)
    _common(compare, out_default="runs/compare")
    compare.set_defaults(func=_compare)

    zoo_cmd = commands.add_parser("zoo", help="train the small ResNets of the paper").add_subparsers(
        dest="zoo_command", required=True
    )
    train = zoo_cmd.add_parser("train", help="train one small ResNet and save it as safetensors")
    train.add_argument("architecture", help="e.g. R1211")
    train.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    train.add_argument("--data-root", help="CIFAR-10 folder (image folders train/ test/, or torchvision's)")
    train.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    train.add_argument("--epochs", type=positive, help="override the recipe's epochs")
    train.add_argument("--width", type=count, default=64)
    _common(train, out_default="zoo")
    train.set_defaults(func=_zoo_train)

    study = commands.add_parser("study", help="run and plot stitching studies").add_subparsers(
        dest="study_command", required=True
    )
    run = study.add_parser("run", help="run a study preset (resumable: rerun to finish)")
    run.add_argument("--config", help="a study TOML file (networks, layers, data, recipe) instead of a preset")
    run.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()) + " (default: quick)",
    )
    run.add_argument("--data-root", help="CIFAR-10 folder (image folders train/ test/, or torchvision's)")
    run.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    run.add_argument("--epochs", type=positive, help="override the epochs of network and stitch training")
    run.add_argument(
        "--max-pairs",
        type=count,
        help="only the first N ordered pairs (and their controls); rerun with a larger N to add the rest "
        "(default: the preset's own: all, but 1 of quick's 2)",
    )
    run.add_argument("--width", type=count, help="override the networks' width (channels of the first stage)")
    run.add_argument("--batch-size", type=count, help="override the stitch batch size (the learning rate scales)")
    run.add_argument("--init", choices=["random", "identity", "lstsq"], help="override the stitch initialisation")
    run.add_argument(
        "--patience",
        type=count,
        help="stop each stitch once its held-out loss has not improved for N epochs (default: all epochs)",
    )
    run.add_argument(
        "--min-delta",
        type=_typed(number(at_least=0, below=1)),
        help="with --patience: the rise in held-out accuracy that counts as an improvement (0.01: one point)",
    )
    run.add_argument(
        "--paper-recipe",
        action="store_true",
        help="the paper's exact stitch recipe: random init, 4 epochs, last state kept (default: least squares, three "
        "quarters of an epoch, the state of lowest held-out loss)",
    )
    run.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision of training and evaluation (default: bf16 on CUDA, fp32 on the CPU)",
    )
    run.add_argument(
        "--memory-budget",
        type=_typed(number(at_least=0)),
        help="GiB of activation cache kept in memory; the rest spills (0: all of it)",
    )
    run.add_argument("--executor", choices=["local", "ray"], default="local", help="run pairs here or as Ray tasks")
    run.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local Ray)")
    run.add_argument("--retry-failed", action="store_true", help="run pairs that failed before again")
    run.add_argument(
        "--keep-going", action="store_true", help="record a pair that raises and go on (default: stop, naming it)"
    )
    run.add_argument("--wait", action="store_true", help="if another process runs in --out, wait for it to finish")
    run.add_argument(
        "--measures",
        type=_listed(check_measures),
        help="comma-separated: stitch plus similarity measures to compute for every cell, e.g. stitch,cka,pwcca "
        "(cka, linear_cka, rbf_cka, cca, svcca, pwcca, procrustes, linear_regression_r2, mutual_knn)",
    )
    _common(run, out_default=None, out_help="output folder (default runs/<preset>, or the study file's out)")
    run.set_defaults(func=_study_run, seed=None, device=None)  # None: not given (a preset's 0, the file's device)

    plot = study.add_parser("plot", help="draw the heatmaps (and CSV) of a run folder")
    plot.add_argument("run_dir")
    plot.add_argument("--diagonal", action="store_true", help="draw the j/J = i/I line")
    plot.add_argument("--grid", action="store_true", help="also draw every pair in one grid")
    plot.set_defaults(func=_study_plot)

    analyze = study.add_parser(
        "analyze",
        help="the paper's analyses of a run folder: triangle, correlations of measures; for a preset's run (or with "
        "--config) also MSE tables, similarity-trained stitches and images",
        description="The paper's analyses, written to RUN_DIR/analysis/. A preset's run folder (or any with --config, "
        "its study file) gets all of them. Any other run folder, e.g. of a Study made in Python, gets what its "
        "store allows: the triangle, the correlations of stored measures with stitching and heatmaps of the "
        "stored cells; the MSE tables, similarity-trained stitches and images need the networks and data, and "
        "are skipped with the reason printed.",
    )
    analyze.add_argument("run_dir")
    analyze.add_argument(
        "--config", help="the study TOML file the run folder was made from: rebuilds its networks and data"
    )
    analyze.add_argument(
        "--mse-epochs", type=positive, help="epochs of the MSE-trained stitches (default: the study's)"
    )
    images = analyze.add_mutually_exclusive_group()
    images.add_argument("--image-pair", nargs=2, metavar=("SENDER", "RECEIVER"), help="pair for image generation")
    images.add_argument("--no-images", action="store_true", help="skip image generation")
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(func=_study_analyze)
    return parser


def _common(parser: argparse.ArgumentParser, *, out_default: str | None, out_help: str | None = None) -> None:
    from .core import PATH, SEED, integer

    count = _typed(integer(1))
    parser.add_argument(
        "--out", type=_typed(PATH), default=out_default, help=out_help or f"output folder (default {out_default})"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=_typed(SEED), default=0)
    parser.add_argument("--limit", type=count, help="use only this many training (and test) samples")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=count,
        help="CPU threads torch uses (default: the cores not busy with other runnable processes now; at least 1)",
    )


def _free_cores(cores: int) -> int:
    """Threads for torch: its default (one per physical core) less the cores other work keeps busy now.

    On 2 cores with two other busy processes, one cell of benchmarks/bench_train.py took 0.65 s with one
    thread and 8.1 s with two (docs/performance.md): torch's thread pools wait for busy cores, so asking
    for more threads than are free costs far more than it can gain on small models.

    "Busy now" is the fewest other runnable processes seen in a few samples of ``/proc/loadavg`` over
    about 0.1 s (its fourth field counts the runnable ones; this process is one of them). The one-minute
    load average is not used: it still counts work that ended up to minutes ago (a ``pip install`` just
    before the main job gave it one thread of two on an idle machine). Without ``/proc`` (macOS,
    Windows), the load average is the fallback.
    """
    others = _runnable_others()
    if others is None:
        try:
            others = os.getloadavg()[0]
        except OSError:  # not available on this platform
            return cores
    return max(1, min(cores, round(cores - others)))


def _runnable_others(samples: int = 5, interval: float = 0.02) -> int | None:
    """The fewest runnable processes besides this one over ``samples`` reads of ``/proc/loadavg``, or None.

    ``/proc/loadavg`` is the Linux kernel's interface (the same on every Linux machine), not a path of this
    workplace; where it is absent the caller falls back to `os.getloadavg`.
    """
    seen = []
    for k in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        seen.append(running - 1)
        if k + 1 < samples:
            time.sleep(interval)
    return max(0, min(seen))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if hasattr(args, "threads"):  # a command that trains or evaluates
        import torch

        from .core import keep_freed_memory

        torch.set_num_threads(args.threads if args.threads is not None else _free_cores(torch.get_num_threads()))
        keep_freed_memory()
    try:
        status = args.func(args)
    except StitchError as err:
        print(f"modelstitch: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `modelstitch layers resnet18 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("modelstitch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
