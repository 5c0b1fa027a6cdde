"""A study from a TOML file: networks (zoo, safetensors, torchvision, timm), layers, data and recipe.

Example ``study.toml``::

    out = "runs/mine"
    measures = ["stitch", "cka"]
    pairs = "all"                  # or [["R1111", "R1211"], ...]

    [data]
    dataset = "digits"             # "digits", "cifar10" (root = ...), or "folder" (root/train, root/test)
    limit = 1000                   # optional: that many training (and test) samples

    [recipe]                       # any Recipe field, for the stitches
    epochs = 4
    batch_size = 64
    base_batch_size = 64

    [networks.R1111]
    zoo = "R1111"                  # a small ResNet trained on the data (kept in out/networks/R1111)
    width = 8
    control = true                 # and its random-weight control "R1111 random"

    [networks.mine]
    file = "zoo/R1211.safetensors" # a zoo checkpoint
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .. import data as ms_data
from .. import zoo
from .._errors import StitchError
from ..core import resolve_device
from ..train import Recipe
from ._presets import Preset, load_dataset, zoo_models
from ._study import Study

__all__ = ["study_from_file"]

_TOP = {"out", "device", "seed", "measures", "pairs", "init", "kind", "data", "recipe", "zoo_recipe", "networks"}
_NETWORK = {"zoo", "width", "control", "file", "torchvision", "timm", "layers", "num_classes"}


def study_from_file(
    path: str | Path, *, out: str | Path | None = None, device: str | None = None, progress: bool = True
) -> Study:
    """Build the `Study` a TOML file describes (training its zoo networks if needed), without running it.

    Args:
        path: the TOML file (see this module's docstring for the format).
        out: the run folder; overrides the file's ``out``.
        device: overrides the file's ``device`` (``"auto"`` by default).
        progress: show progress while zoo networks train.

    Raises:
        StitchError: the file is missing or not TOML, or names an unknown key, network source or dataset;
            the message says which and what is allowed.
    """
    config = _read(Path(path))
    unknown = sorted(set(config) - _TOP)
    if unknown:
        raise StitchError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_TOP)}")
    if not isinstance(config.get("networks"), Mapping) or not config["networks"]:
        raise StitchError(f"{path}: add at least one [networks.NAME] table (zoo = ..., file = ..., torchvision = ...)")
    seed = int(config.get("seed", 0))
    out = Path(out or config.get("out") or "runs/study")
    dev = resolve_device(device or config.get("device", "auto"))
    data_cfg = dict(config.get("data", {"dataset": "digits"}))
    train, test, augmented, dataset = _datasets(data_cfg, seed, path)
    zoo_recipe = _recipe(config.get("zoo_recipe", {}), zoo.CLASSIFIER_RECIPE.replace(channels_last=False), path)
    recipe = _recipe(config.get("recipe", {}), Recipe(), path).replace(seed=seed)
    models: dict[str, nn.Module] = {}
    layers: dict[str, list[str]] = {}
    controls: dict[str, str] = {}
    for name, spec in config["networks"].items():
        if not isinstance(spec, Mapping):
            raise StitchError(f"{path}: [networks.{name}] must be a table")
        bad = sorted(set(spec) - _NETWORK)
        if bad:
            raise StitchError(f"{path}: [networks.{name}] has unknown key(s) {bad}; allowed: {sorted(_NETWORK)}")
        if "zoo" in spec:
            preset = Preset(
                name=f"{path}:{name}",
                description="",
                architectures=(spec["zoo"],),
                width=int(spec.get("width", 64)),
                dataset=dataset,
                zoo_recipe=zoo_recipe,
                recipe=recipe,
                controls=bool(spec.get("control", False)),
            )
            trained, _ = zoo_models(  # each network in its own folder: two of one architecture do not collide
                preset, out=out / "networks" / name, train_data=augmented, test_data=test, seed=seed, device=dev,
                progress=progress,
            )  # fmt: skip
            arch = zoo.architecture_name(spec["zoo"])
            models[name] = trained[arch]
            if preset.controls:
                models[f"{name} random"] = trained[f"{arch} random"]
                controls[name] = f"{name} random"
        else:
            models[name] = _load_network(name, spec, path)
        if "layers" in spec:
            layers[name] = [str(layer) for layer in spec["layers"]]
    for name, control in controls.items():
        if name in layers:
            layers[control] = layers[name]
    pairs = config.get("pairs", "all")
    if not isinstance(pairs, str):
        pairs = [tuple(p) for p in pairs]
    return Study(
        models,
        train_data=train,
        test_data=test,
        out=out,
        pairs=pairs,
        layers=layers or None,
        controls=controls,
        recipe=recipe,
        kind=config.get("kind", "auto"),
        init=config.get("init"),
        seed=seed,
        device=dev,
        measures=tuple(config.get("measures", ("stitch",))),
    )


def _read(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise StitchError(f"study file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise StitchError(f"{path} is not valid TOML: {err}") from None


def _datasets(cfg: dict[str, Any], seed: int, path: Path) -> tuple[Any, Any, Any, str]:
    dataset = cfg.pop("dataset", "digits")
    root, limit = cfg.pop("root", None), cfg.pop("limit", None)
    if cfg:
        raise StitchError(f"{path}: [data] has unknown key(s) {sorted(cfg)}; allowed: dataset, root, limit")
    if dataset == "folder":
        if root is None:
            raise StitchError(f"{path}: [data] dataset = 'folder' needs root = <folder with train/ and test/>")
        train = ms_data.image_folder(Path(root) / "train")
        augmented = ms_data.image_folder(Path(root) / "train", augment=True)
        test = ms_data.image_folder(Path(root) / "test")
    elif dataset in ("digits", "cifar10"):
        train = load_dataset(dataset, train=True, root=root)
        augmented = load_dataset(dataset, train=True, root=root, augment=True)
        test = load_dataset(dataset, train=False, root=root)
    else:
        raise StitchError(f"{path}: [data] dataset = {dataset!r}; use 'digits', 'cifar10' or 'folder'")
    train, augmented, test = (ms_data.subset(d, limit, seed=seed) for d in (train, augmented, test))
    return train, test, augmented, dataset


def _recipe(fields: Mapping[str, Any], base: Recipe, path: Path) -> Recipe:
    try:
        return base.replace(**fields)
    except TypeError as err:
        raise StitchError(f"{path}: a recipe table has a field Recipe does not know ({err})") from None


def _load_network(name: str, spec: Mapping[str, Any], path: Path) -> nn.Module:
    num_classes = int(spec.get("num_classes", 10))
    if "file" in spec:
        return zoo.load_model(Path(spec["file"]))
    if "torchvision" in spec:
        import torchvision

        if spec["torchvision"] not in torchvision.models.list_models():
            raise StitchError(f"{path}: [networks.{name}] torchvision = {spec['torchvision']!r} is not a model name")
        return torchvision.models.get_model(spec["torchvision"], num_classes=num_classes).eval()
    if "timm" in spec:
        import timm

        if not timm.is_model(spec["timm"]):
            raise StitchError(f"{path}: [networks.{name}] timm = {spec['timm']!r} is not a timm model name")
        return timm.create_model(spec["timm"], num_classes=num_classes, pretrained=False).eval()
    raise StitchError(f"{path}: [networks.{name}] needs one of zoo = ..., file = ..., torchvision = ..., timm = ...")
