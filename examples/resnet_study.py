"""The stitching study of Hernandez et al. through the Python API: small ResNets, random controls, heatmaps.

    python examples/resnet_study.py --quick [--device auto|cpu|cuda] [--out DIR]
    python examples/resnet_study.py --data-root /data/cifar10 --device cuda [--out DIR]

Builds the paper's small ResNets (`modelstitch.zoo.small_resnet`: ``R1111`` ..
``R2222``, the digits being the residual blocks per stage), trains each as a
classifier (`zoo.train_classifier`), makes a random-weight control of each
(`zoo.random_control`), and runs a `modelstitch.Study`: every layer of the
sender stitched into every layer of the receiver, for each pair of trained
networks and for the same pair of random controls. It prints the accuracy
matrix (rows: sender layers, columns: receiver layers) of the first network
stitched into the last one, and of their controls, and writes
``heatmaps.png``/``.svg`` (each trained pair beside its control pair; without
``--quick`` a few pairs, plus ``grid.png`` with all of them), ``cells.csv``
and the resumable store ``study.sqlite`` to ``--out`` (default
``runs/example-quick`` or ``runs/example-paper``).

``--quick``: width-8 R1111 and R2111 on a 512-image subset of the offline
digits (256 test images), one pair ``(R1111, R2111)`` plus its control pair,
three epochs of stitch training: 60 cells, about a minute on a CPU. The numbers
are then rough; the trained pair still stitches clearly above chance (0.1),
the random controls stay near it.

Without ``--quick``: all 16 architectures at width 64, every ordered pair, on
CIFAR-10 from ``--data-root`` (an image-folder copy with ``train/<class>/`` and
``test/<class>/``, or torchvision's CIFAR-10 folder; ``--download`` fetches the
latter). That is the paper's study (about 25,000 cells): run it on a GPU, or
use the command line's ``modelstitch study run --preset paper``. Rerunning
with the same ``--out`` resumes: trained networks are loaded from
``OUT/zoo/`` and finished pairs are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import modelstitch as ms
from modelstitch import data, zoo


def load_data(args: argparse.Namespace):
    """(augmented train, plain train, test) datasets."""
    if args.quick:
        train, test = data.digits(train=True), data.digits(train=False)
        train, test = data.subset(train, 512), data.subset(test, 256)
        return train, train, test
    if args.data_root is None:
        raise SystemExit("without --quick, pass --data-root DIR (CIFAR-10); add --download to fetch it")
    root = Path(args.data_root)
    if (root / "train").is_dir():  # an image-folder copy
        train_aug = data.cifar10_folder(root, train=True, augment=True)
        train = data.cifar10_folder(root, train=True)
        test = data.cifar10_folder(root, train=False)
    else:  # torchvision's folder
        train_aug = data.cifar10(root, train=True, augment=True, download=args.download)
        train = data.cifar10(root, train=True)
        test = data.cifar10(root, train=False)
    return train_aug, train, test


def build_zoo(args, train_aug, test, device) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Train (or load from OUT/zoo) each network and add its random control."""
    architectures = ["R1111", "R2111"] if args.quick else list(zoo.ARCHITECTURES)
    width = 8 if args.quick else 64
    if args.quick:
        recipe = zoo.CLASSIFIER_RECIPE.replace(lr=0.05, batch_size=64, base_batch_size=64, epochs=6)
    else:
        recipe = zoo.CLASSIFIER_RECIPE  # 30 epochs, lr 0.1 at batch 128, the standard CIFAR recipe
    models: dict[str, torch.nn.Module] = {}
    controls: dict[str, str] = {}
    for k, arch in enumerate(architectures):
        path = Path(args.out) / "zoo" / f"{arch}.safetensors"
        if path.is_file():
            model = zoo.load_model(path, expected_architecture=arch)
            accuracy = model.checkpoint_metadata["test_accuracy"]
            print(f"{arch}: loaded {path} (test accuracy {accuracy:.3f})")
        else:
            torch.manual_seed(k)
            model = zoo.small_resnet(arch, width=width)
            t = time.perf_counter()
            result = zoo.train_classifier(
                model, train_aug, recipe=recipe.replace(seed=k), test_data=test, device=device, progress=False
            )
            accuracy = result["test_accuracy"]
            zoo.save_model(path, model, dataset="digits" if args.quick else "cifar10", test_accuracy=accuracy, seed=k)
            print(f"{arch}: trained, test accuracy {accuracy:.3f} ({time.perf_counter() - t:.1f} s)")
        models[arch] = model
        models[f"{arch} random"] = zoo.random_control(arch, seed=1000 + k, width=width)
        controls[arch] = f"{arch} random"
    return models, controls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two narrow networks on offline digits, one pair")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    parser.add_argument("--out", default=None, help="run folder (default runs/example-quick or runs/example-paper)")
    parser.add_argument("--data-root", help="CIFAR-10: an image-folder copy (train/, test/) or torchvision's folder")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 to --data-root")
    args = parser.parse_args()
    args.out = args.out or ("runs/example-quick" if args.quick else "runs/example-paper")
    device = ms.core.resolve_device(args.device)
    start = time.perf_counter()

    train_aug, train, test = load_data(args)
    models, controls = build_zoo(args, train_aug, test, device)

    if args.quick:
        pairs = [("R1111", "R2111")]  # the control pair (R1111 random, R2111 random) is added by the Study
        recipe = ms.Recipe(lr=0.05, batch_size=64, base_batch_size=64, epochs=3)
    else:
        pairs = "all"
        recipe = ms.Recipe()  # the paper's stitch recipe: SGD, lr 0.01 at batch 256, 4 epochs
    study = ms.Study(
        models,
        train_data=train,  # no augmentation: the sender activations are cached
        test_data=test,
        out=args.out,
        pairs=pairs,
        controls=controls,
        recipe=recipe,
        device=device,
    )
    print(f"\n{len(study.cells())} cells over {len(study.pairs)} pairs; store {study.store_path}")
    t = time.perf_counter()
    study.run(progress=not args.quick)
    print(f"study ran in {time.perf_counter() - t:.1f} s")

    np.set_printoptions(precision=2, suppress=True, linewidth=120)
    trained = list(controls)  # the trained networks, in order
    first, last = trained[0], trained[-1]  # R1111 and R2111 (--quick), or R1111 and R2222
    for a, b in [(first, last), (controls[first], controls[last])]:
        matrix = study.matrix(a, b)
        print(f"\n{a} -> {b}: accuracy, rows = sender layers {study.layers[a]}")
        print(f"{'':>10}columns = receiver layers {study.layers[b]}")
        print(matrix)
        print(f"mean {np.nanmean(matrix):.3f}, max {np.nanmax(matrix):.3f}")
    study.to_csv()
    # each trained pair beside its control pair; for the full study only a few pairs, plus a grid of all
    shown = None if args.quick else [(first, first), (first, last), (last, first), (last, last)]
    study.plot(pairs=shown, diagonal=True)
    print(f"\nwrote {study.out / 'heatmaps.png'}, {study.out / 'heatmaps.svg'} and {study.out / 'cells.csv'}")
    if not args.quick:
        study.results.plot_grid()
        print(f"wrote {study.out / 'grid.png'}: every pair of the study")
    print(f"done in {time.perf_counter() - start:.1f} s on {device}")


if __name__ == "__main__":
    main()
