"""Ready-made studies: ``quick`` (offline, minutes on a CPU), ``paper`` and ``resnet18-vs-34``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data as ms_data
from .. import zoo
from .._errors import StitchError
from ..core import fingerprint_data, resolve_device
from ..train import Recipe
from ._store import ResultStore, read_run_meta
from ._study import Study

__all__ = ["PRESETS", "Preset", "build_preset_study", "load_dataset", "open_preset_study", "run_preset", "zoo_models"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A study recipe: which small ResNets, on which data, trained how.

    Attributes:
        name: the preset's name.
        description: one line for ``--help``.
        architectures: small-ResNet block counts (``"R1211"`` or tuples).
        width: channels of the first stage.
        dataset: ``"digits"`` (offline, bundled with scikit-learn) or ``"cifar10"``.
        zoo_recipe: how each network is trained from scratch.
        recipe: how each stitch is trained.
        controls: add a random-weight control of every network.
    """

    name: str
    description: str
    architectures: tuple[str | tuple[int, ...], ...]
    width: int
    dataset: str
    zoo_recipe: Recipe
    recipe: Recipe
    controls: bool = True


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "quick",
            "two narrow small ResNets and their random controls on offline 8x8 digits; minutes on a CPU",
            ("R1111", "R1211"),
            width=8,
            dataset="digits",
            zoo_recipe=zoo.CLASSIFIER_RECIPE.replace(
                lr=0.05, batch_size=64, base_batch_size=64, epochs=4, channels_last=False
            ),
            recipe=Recipe(lr=0.05, batch_size=64, base_batch_size=64, epochs=4),
        ),
        Preset(
            "paper",
            "all 16 small ResNets R1111..R2222 (width 64) and their controls on CIFAR-10, the paper's recipe",
            zoo.ARCHITECTURES,
            width=64,
            dataset="cifar10",
            zoo_recipe=zoo.CLASSIFIER_RECIPE,
            recipe=Recipe(),
        ),
        Preset(
            "resnet18-vs-34",
            "ResNet18 (R2222) and ResNet34 (3,4,6,3) in both directions on CIFAR-10 (the paper's appendix)",
            ("R2222", (3, 4, 6, 3)),
            width=64,
            dataset="cifar10",
            zoo_recipe=zoo.CLASSIFIER_RECIPE,
            recipe=Recipe(),
        ),
    ]
}


def load_dataset(
    name: str, *, train: bool, root: str | Path | None = None, augment: bool = False, download: bool = False
) -> Any:
    """A preset's dataset split.

    Args:
        name: ``"digits"`` or ``"cifar10"``.
        train: the training split (else the test split).
        root: for CIFAR-10, a folder with ``train/<class>/`` and ``test/<class>/``
            images, or torchvision's CIFAR-10 folder.
        augment: random crop and flip (CIFAR-10 only).
        download: let torchvision download CIFAR-10 into ``root``.
    """
    if name == "digits":
        return ms_data.digits(train=train)
    if name == "cifar10":
        if root is None:
            raise StitchError("CIFAR-10 needs --data-root DIR (an image folder copy, or where torchvision keeps it)")
        split = Path(root) / ("train" if train else "test")
        if split.is_dir():
            return ms_data.cifar10_folder(root, train=train, augment=augment)
        return ms_data.cifar10(root, train=train, augment=augment, download=download)
    raise StitchError(f"unknown dataset {name!r}: use 'digits' or 'cifar10'")


def zoo_models(
    preset: Preset,
    *,
    out: Path,
    train_data: Any,
    test_data: Any,
    seed: int,
    device: torch.device,
    epochs: float | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Train (or load from ``out/zoo``) each network of a preset, and build its random control.

    Returns:
        ``(models, controls)``: networks by name (controls named ``"<arch> random"``)
        and the map from each network to its control.
    """
    recipe = preset.zoo_recipe.replace(seed=seed, **({} if epochs is None else {"epochs": epochs}))
    models: dict[str, torch.nn.Module] = {}
    controls: dict[str, str] = {}
    training = {"recipe": repr(recipe), "width": preset.width, "data": fingerprint_data(train_data)}
    for k, blocks in enumerate(preset.architectures):
        name = zoo.architecture_name(blocks)
        path = out / "zoo" / f"{name}.safetensors"
        model = zoo.load_model(path, expected_architecture=name) if path.is_file() else None
        if model is not None and model.checkpoint_metadata.get("training") != _jsonable(training):
            if progress:
                tqdm.write(f"{path} was trained with another recipe or data; training {name} again")
            model = None
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + k)
                model = zoo.small_resnet(blocks, width=preset.width)
            if progress:
                tqdm.write(f"training {name} (width {preset.width}) on {preset.dataset}")
            result = zoo.train_classifier(
                model, train_data, recipe=recipe, test_data=test_data, device=device, progress=progress
            )
            zoo.save_model(
                path,
                model,
                dataset=preset.dataset,
                test_accuracy=result["test_accuracy"],
                seed=seed + k,
                training=training,
            )
        models[name] = model.eval()
        if preset.controls:
            control = f"{name} random"
            models[control] = zoo.random_control(blocks, seed=seed + 1000 + k, width=preset.width)
            controls[name] = control
    return models, controls


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from a checkpoint's JSON metadata."""
    return json.loads(json.dumps(value))


def build_preset_study(
    name: str,
    *,
    out: str | Path,
    data_root: str | Path | None = None,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    limit: int | None = None,
    epochs: float | None = None,
    max_pairs: int | None = None,
    download: bool = False,
    progress: bool = True,
    measures: Sequence[str] = ("stitch",),
) -> Study:
    """Train (or load from ``out/zoo``) a preset's networks and set up its `Study` without running it.

    The arguments are those of `run_preset`; they are recorded in the run
    folder so that `open_preset_study` can set the same study up again.
    """
    if name not in PRESETS:
        raise StitchError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if data_root is not None and preset.dataset == "digits":
        raise StitchError(
            f"preset {name!r} runs on the bundled digits and reads no --data-root; drop it, or choose a CIFAR-10 "
            f"preset ({', '.join(sorted(p.name for p in PRESETS.values() if p.dataset == 'cifar10'))})"
        )
    out = Path(out)
    dev = resolve_device(device)
    train_aug = load_dataset(preset.dataset, train=True, root=data_root, augment=True, download=download)
    train = load_dataset(preset.dataset, train=True, root=data_root, download=download)
    test = load_dataset(preset.dataset, train=False, root=data_root, download=download)
    train_aug, train, test = (ms_data.subset(d, limit, seed=seed) for d in (train_aug, train, test))
    models, controls = zoo_models(
        preset, out=out, train_data=train_aug, test_data=test, seed=seed, device=dev, epochs=epochs, progress=progress
    )
    recipe = preset.recipe.replace(seed=seed, **({} if epochs is None else {"epochs": epochs}))
    pairs: Any = "all"
    if max_pairs is not None:
        trained = [name for name in models if name not in controls.values()]
        pairs = [(a, b) for a in trained for b in trained][:max_pairs]
    study = Study(
        models,
        train_data=train,
        test_data=test,
        out=out,
        pairs=pairs,
        controls=controls,
        recipe=recipe,
        seed=seed,
        device=dev,
        measures=measures,
    )
    settings = {"name": name, "data_root": None if data_root is None else str(data_root), "seed": seed}
    settings["measures"] = list(measures)
    settings.update({"limit": limit, "epochs": epochs, "max_pairs": max_pairs, "dataset": preset.dataset})
    with ResultStore(study.store_path) as store:
        store.set_meta("preset", settings)
    return study


def open_preset_study(out: str | Path, *, device: str | torch.device | None = "auto", progress: bool = True) -> Study:
    """Set up again the study of a run folder made by `run_preset` (networks from ``out/zoo``)."""
    settings = read_run_meta(out, "preset")
    if settings is None:
        raise StitchError(f"{out} was not made from a preset; set the Study up in Python and pass it instead")
    return build_preset_study(
        settings["name"],
        out=out,
        data_root=settings["data_root"],
        device=device,
        seed=settings["seed"],
        limit=settings["limit"],
        epochs=settings["epochs"],
        max_pairs=settings.get("max_pairs"),
        progress=progress,
        measures=settings.get("measures", ["stitch"]),
    )


def run_preset(
    name: str,
    *,
    out: str | Path,
    progress: bool = True,
    run_options: dict[str, Any] | None = None,
    **options: Any,
) -> Study:
    """Train the zoo of a preset (or reuse it), run its study, write the CSV and heatmaps.

    Rerunning with the same ``out`` resumes: trained networks and finished
    cells are reused.

    Args:
        name: a key of `PRESETS`.
        out: the run folder.
        progress: show progress bars.
        **options: ``data_root`` (CIFAR-10 location; not needed for ``quick``),
            ``device``, ``seed`` (networks, controls, data order and every
            stitch), ``limit`` (use only this many training and test samples),
            ``epochs`` (override the epochs of both network and stitch
            training), ``max_pairs`` (run only the first N ordered pairs of trained
            networks and their control pairs, to try a preset before the whole
            of it; rerun without it to add the rest), ``download`` (let
            torchvision fetch CIFAR-10), ``measures`` (``("stitch", "cka", ...)``,
            see `Study`).
        run_options: passed to `Study.run` (``executor``, ``address``,
            ``retry_failed``, ...).

    Returns:
        The finished `Study`.
    """
    study = build_preset_study(name, out=out, progress=progress, **options)
    study.run(progress=progress, **(run_options or {}))
    study.to_csv()
    study.plot()
    if len(study.measures) > 1:
        study.plot_measures()
    return study
