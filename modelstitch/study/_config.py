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

Language models (``pip install "modelstitch[lm]"``)::

    [data]
    dataset = "text"               # or "pydoc": Python's own help text, bundled
    file = "corpus.txt"            # a UTF-8 text file: the last 10% is the test split
    seq_len = 128                  # tokens per sequence
    tokenizer = "gpt2"             # a from_pretrained name or folder; "bytes" (default): one token per byte

    [networks.gpt2]
    huggingface = "gpt2"           # AutoModelForCausalLM.from_pretrained(name or folder); its blocks are the layers

    [networks.distilgpt2]
    huggingface = "distilgpt2"
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as ms_data
from .. import zoo
from .._errors import StitchError, first_line
from ..core import (
    BOOLEAN,
    SEED,
    TEXT,
    Allowed,
    check_names,
    choice,
    duplicates,
    integer,
    number,
    parse_address,
    resolve_device,
)
from ..stitches import STITCH_KINDS
from ..train import Recipe
from ._presets import INITS, Preset, check_measures, load_dataset, zoo_models
from ._study import Study

__all__ = ["study_from_file"]


def _is_architecture(value: Any) -> bool:
    try:
        zoo.parse_blocks(value)
    except StitchError:
        return False
    return True


_TABLE = Allowed("a table", lambda v: isinstance(v, Mapping))
_TOP: dict[str, Allowed | None] = {  # None: checked on its own (measures, pairs)
    "out": TEXT,
    "device": TEXT,
    "seed": SEED,
    "measures": None,
    "pairs": None,
    "init": choice(INITS),
    "kind": choice(STITCH_KINDS),
    "data": _TABLE,
    "recipe": _TABLE,
    "zoo_recipe": _TABLE,
    "networks": _TABLE,
}
_DATA: dict[str, Allowed] = {
    "dataset": choice(("digits", "cifar10", "folder", "text", "pydoc")),
    "root": TEXT,
    "limit": integer(1),
    "file": TEXT,
    "seq_len": integer(2),
    "tokenizer": TEXT,
}
_TEXT_KEYS = ("file", "seq_len", "tokenizer")
"""[data] keys that only the text datasets read."""
_SOURCES = ("zoo", "file", "torchvision", "timm", "huggingface")
_NETWORK: dict[str, Allowed | None] = {  # None: checked on its own (layers)
    "zoo": Allowed("an architecture such as 'R1211' or four block counts such as [3, 4, 6, 3]", _is_architecture),
    "width": integer(1),
    "control": BOOLEAN,
    "file": TEXT,
    "torchvision": TEXT,
    "timm": TEXT,
    "huggingface": TEXT,
    "layers": None,
    "num_classes": integer(1),
}
_ONLY_WITH = {"width": ("zoo",), "control": ("zoo",), "num_classes": ("torchvision", "timm")}
"""Network keys that only some sources read."""


def study_from_file(
    path: str | Path, *, out: str | Path | None = None, device: str | None = None, progress: bool = True
) -> Study:
    """Build the `Study` a TOML file describes (training its zoo networks if needed), without running it.

    Every key is checked by type and range, pairs and layers by name, before any network is trained or any
    folder is made.

    Args:
        path: the TOML file (see this module's docstring for the format).
        out: the run folder; overrides the file's ``out``.
        device: overrides the file's ``device`` (``"auto"`` by default).
        progress: show progress while zoo networks train.

    Raises:
        StitchError: the file is missing or not TOML, or names an unknown key, network source, dataset,
            pair or layer, or a value of the wrong type or out of range; the message names the table and
            key and says what is allowed.
    """
    path = Path(path)
    config = _read(path)
    networks = _check(config, path)
    seed = config.get("seed", 0)
    out = Path(out or config.get("out") or "runs/study")
    dev = resolve_device(device or config.get("device", "auto"))
    zoo_recipe = _recipe(
        config.get("zoo_recipe", {}), zoo.CLASSIFIER_RECIPE.replace(channels_last=False), "zoo_recipe", path
    )
    recipe = _recipe(config.get("recipe", {}), Recipe(), "recipe", path).replace(seed=seed)
    loaded = {name: _load_network(name, spec, path) for name, spec in networks.items() if "zoo" not in spec}
    for name, spec in networks.items():
        _check_layers(name, spec, loaded.get(name), path)
    train, test, augmented, dataset = _datasets(dict(config.get("data", {})), seed)
    models: dict[str, nn.Module] = {}
    layers: dict[str, list[str]] = {}
    controls: dict[str, str] = {}
    for name, spec in networks.items():
        if "zoo" in spec:
            preset = Preset(
                name=f"{path}:{name}",
                description="",
                architectures=(spec["zoo"],),
                width=spec.get("width", 64),
                dataset=dataset,
                zoo_recipe=zoo_recipe,
                recipe=recipe,
                controls=spec.get("control", False),
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
            models[name] = loaded[name]
        if "layers" in spec:
            layers[name] = list(spec["layers"])
    for name, control in controls.items():
        if name in layers:
            layers[control] = layers[name]
    return Study(
        models,
        train_data=train,
        test_data=test,
        out=out,
        pairs=_pairs(config.get("pairs", "all")),
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


# ---------------------------------------------------------------- checks, before any work


def _check(config: Mapping[str, Any], path: Path) -> dict[str, Mapping[str, Any]]:
    """Check every key of a study file by type and range, and its pairs by name.

    Returns:
        The ``[networks.NAME]`` tables, by name.

    Raises:
        StitchError: the first key that is wrong, naming its table and what is allowed.
    """
    _check_keys(config, _TOP, f"{path}:")
    networks = config.get("networks")
    if not networks:
        raise StitchError(f"{path}: add at least one [networks.NAME] table (zoo = ..., file = ..., torchvision = ...)")
    if "measures" in config:
        check_measures(config["measures"], f"{path}: measures")
    kind, init = config.get("kind", "auto"), config.get("init")
    if init == "lstsq" and kind not in ("auto", "linear"):
        raise StitchError(f"{path}: init = 'lstsq' needs kind = 'linear' stitches, not kind = {kind!r}; use 'random'")
    _check_data(config.get("data", {}), path)
    for table in ("recipe", "zoo_recipe"):
        _check_recipe(config.get(table, {}), table, path)
    names: list[str] = []
    for name, spec in networks.items():
        _check_network(name, spec, path)
        names.append(name)
        if spec.get("control", False):
            names.append(f"{name} random")
    clash = duplicates(names)  # a control "a random" and a [networks."a random"] table
    if clash:
        raise StitchError(
            f"{path}: the control of [networks.{clash[0].removesuffix(' random')}] is named {clash[0]!r}, as is a "
            "[networks] table; rename that table"
        )
    _check_pairs(config.get("pairs", "all"), names, path)
    return dict(networks)


def _check_keys(table: Mapping[str, Any], rules: Mapping[str, Allowed | None], where: str) -> None:
    """Refuse keys ``rules`` does not list, and values their rule does not allow.

    Args:
        table: the keys and values of one TOML table.
        rules: what each key may be (``None``: checked by the caller).
        where: ``"study.toml:"`` or ``"study.toml: [data]"``, to start each message.
    """
    unknown = sorted(set(table) - set(rules))
    if unknown:
        has = " has" if where.endswith("]") else ""
        raise StitchError(f"{where}{has} unknown key(s) {unknown}; allowed: {sorted(rules)}")
    for key, value in table.items():
        allowed = rules[key]
        if allowed is not None:
            allowed.check(value, f"{where} {key}")


def _check_data(cfg: Mapping[str, Any], path: Path) -> None:
    _check_keys(cfg, _DATA, f"{path}: [data]")
    dataset, root = cfg.get("dataset", "digits"), cfg.get("root")
    if dataset == "folder" and root is None:
        raise StitchError(f"{path}: [data] dataset = 'folder' needs root = <folder with train/ and test/>")
    if dataset == "cifar10" and root is None:
        raise StitchError(f"{path}: [data] dataset = 'cifar10' needs root = <an image-folder copy or torchvision's>")
    if dataset in ("digits", "pydoc") and root is not None:
        raise StitchError(f"{path}: [data] dataset = {dataset!r} is bundled and reads no root; drop root = {root!r}")
    text_keys = [k for k in _TEXT_KEYS if k in cfg]
    if dataset not in ("text", "pydoc") and text_keys:
        raise StitchError(f"{path}: [data] {text_keys[0]} applies to dataset = 'text' or 'pydoc' only")
    if dataset == "text" and "file" not in cfg:
        raise StitchError(f"{path}: [data] dataset = 'text' needs file = <a UTF-8 text file>")
    if dataset == "pydoc" and "file" in cfg:
        raise StitchError(f"{path}: [data] dataset = 'pydoc' is bundled and reads no file; use dataset = 'text'")
    if "file" in cfg and not Path(cfg["file"]).is_file():
        raise StitchError(f"{path}: [data] file = {cfg['file']!r} does not exist")
    if root is not None and not Path(root).is_dir():
        raise StitchError(f"{path}: [data] root = {root!r} is not a folder")


_BY_TYPE: dict[Any, Allowed] = {
    int: integer(),
    float: number(),  # an int or a float
    bool: BOOLEAN,
    str: Allowed("a string", lambda v: isinstance(v, str)),
}
_ANY = Allowed("any value", lambda v: True)


@functools.cache
def _recipe_fields() -> dict[str, Allowed]:
    """What each `Recipe` field may be in TOML, from its annotation (``float | None``: a number; TOML has no None)."""
    hints = typing.get_type_hints(Recipe)
    fields = {}
    for field in dataclasses.fields(Recipe):
        kinds = [k for k in typing.get_args(hints[field.name]) if k is not type(None)] or [hints[field.name]]
        fields[field.name] = _BY_TYPE.get(kinds[0], _ANY) if len(kinds) == 1 else _ANY
    return fields


def _check_recipe(fields: Mapping[str, Any], table: str, path: Path) -> None:
    allowed = _recipe_fields()
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise StitchError(
            f"{path}: a recipe table has a field Recipe does not know: [{table}] {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    if "seed" in fields:
        raise StitchError(f"{path}: [{table}] seed: the study's seed seeds every recipe; set seed = ... at the top")
    for key, value in fields.items():
        allowed[key].check(value, f"{path}: [{table}] {key}")


def _check_network(name: str, spec: Any, path: Path) -> None:
    label = f"[networks.{name}]"
    if not isinstance(spec, Mapping):
        raise StitchError(f"{path}: {label} must be a table")
    _check_keys(spec, _NETWORK, f"{path}: {label}")
    sources = [s for s in _SOURCES if s in spec]
    if not sources:
        raise StitchError(
            f"{path}: {label} needs one of zoo = ..., file = ..., torchvision = ..., timm = ..., huggingface = ..."
        )
    if len(sources) > 1:
        raise StitchError(f"{path}: {label} has {' and '.join(sources)}; give one source of the network")
    for key, readers in _ONLY_WITH.items():
        if key in spec and sources[0] not in readers:
            only = " and ".join(readers)
            raise StitchError(f"{path}: {label} {key} applies to {only} networks only, not {sources[0]} = ...")
    if "file" in spec and not Path(spec["file"]).is_file():
        raise StitchError(f"{path}: {label} file = {spec['file']!r} does not exist")
    if "layers" in spec:
        check_names(spec["layers"], f"{path}: {label} layers", noun="layer", example="['stem', 'layer1.0']")


def _check_layers(name: str, spec: Mapping[str, Any], model: nn.Module | None, path: Path) -> None:
    """Refuse layers the network does not have, or no ``layers`` where it has no default, before any training.

    Args:
        name: the network's table name.
        spec: its table.
        model: the network, or ``None`` for a zoo network (not trained yet: its architecture is checked).
        path: the study file.
    """
    if model is None:  # the architecture alone, without weights in memory
        with torch.device("meta"):
            model = zoo.small_resnet(spec["zoo"], width=spec.get("width", 64))
    if "layers" not in spec:
        try:
            zoo.layer_names(model)
        except StitchError as err:
            raise StitchError(f"{path}: [networks.{name}] add layers = [...], the layers to stitch ({err})") from None
        return
    for layer in spec["layers"]:
        try:
            parse_address(model, layer)
        except StitchError as err:
            raise StitchError(f"{path}: [networks.{name}] layers: {err}") from None


def _check_pairs(pairs: Any, names: list[str], path: Path) -> None:
    if pairs == "all":
        return
    example = f"[[{names[0]!r}, {names[-1]!r}]]"
    if not isinstance(pairs, list):
        raise StitchError(
            f"{path}: pairs must be 'all' or a list of [sender, receiver] pairs such as {example}, got {pairs!r}"
        )
    if not pairs:
        raise StitchError(f"{path}: pairs is empty: use 'all' or list [sender, receiver] pairs such as {example}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            raise StitchError(f"{path}: pairs[{i}] must be a [sender, receiver] pair of network names, got {pair!r}")
        for n in pair:
            if n not in names:
                raise StitchError(f"{path}: pairs[{i}] names {n!r}, which is not a network of this file: {names}")
    repeated = duplicates([tuple(p) for p in pairs])
    if repeated:
        raise StitchError(f"{path}: pairs lists {list(repeated[0])!r} more than once")


def _pairs(pairs: Any) -> Any:
    return pairs if isinstance(pairs, str) else [tuple(p) for p in pairs]


# ---------------------------------------------------------------- building, once checked


def _datasets(cfg: dict[str, Any], seed: int) -> tuple[Any, Any, Any, str]:
    dataset, root, limit = cfg.get("dataset", "digits"), cfg.get("root"), cfg.get("limit")
    if dataset in ("text", "pydoc"):
        text = ms_data.pydoc_corpus() if dataset == "pydoc" else Path(cfg["file"]).read_text(encoding="utf-8")
        tokenizer = _tokenizer(cfg.get("tokenizer", "bytes"))
        train, test = ms_data.text_splits(text, cfg.get("seq_len", 64), tokenizer=tokenizer, limit=limit, seed=seed)
        return train, test, train, dataset
    if dataset == "folder":
        train = ms_data.image_folder(Path(root) / "train")
        augmented = ms_data.image_folder(Path(root) / "train", augment=True)
        test = ms_data.image_folder(Path(root) / "test")
    else:
        train = load_dataset(dataset, train=True, root=root)
        augmented = load_dataset(dataset, train=True, root=root, augment=True)
        test = load_dataset(dataset, train=False, root=root)
    train, augmented, test = (ms_data.subset(d, limit, seed=seed) for d in (train, augmented, test))
    return train, test, augmented, dataset


def _recipe(fields: Mapping[str, Any], base: Recipe, table: str, path: Path) -> Recipe:
    """``base`` with a checked recipe table's fields; Recipe's own range checks name the table."""
    try:
        return base.replace(**fields)
    except (StitchError, TypeError) as err:
        raise StitchError(f"{path}: [{table}] {err}") from None


def _tokenizer(name: str) -> Any:
    """``None`` for ``"bytes"`` (`byte_tokens`), else ``AutoTokenizer.from_pretrained(name)``."""
    if name == "bytes":
        return None
    from ..zoo._lm import _transformers

    try:
        return _transformers().AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise StitchError(f"[data] tokenizer = {name!r} cannot be loaded ({first_line(err)})") from None


def _load_network(name: str, spec: Mapping[str, Any], path: Path) -> nn.Module:
    num_classes = spec.get("num_classes", 10)
    if "huggingface" in spec:
        from ..zoo._lm import _transformers

        try:
            model = _transformers().AutoModelForCausalLM.from_pretrained(spec["huggingface"])
        except (OSError, ValueError) as err:
            raise StitchError(
                f"{path}: [networks.{name}] huggingface = {spec['huggingface']!r} cannot be loaded as a causal "
                f"language model ({first_line(err)})"
            ) from None
        return model.eval()
    if "file" in spec:
        return zoo.load_model(Path(spec["file"]))
    if "torchvision" in spec:
        import torchvision

        if spec["torchvision"] not in torchvision.models.list_models():
            raise StitchError(f"{path}: [networks.{name}] torchvision = {spec['torchvision']!r} is not a model name")
        return torchvision.models.get_model(spec["torchvision"], num_classes=num_classes).eval()
    import timm

    if not timm.is_model(spec["timm"]):
        raise StitchError(f"{path}: [networks.{name}] timm = {spec['timm']!r} is not a timm model name")
    return timm.create_model(spec["timm"], num_classes=num_classes, pretrained=False).eval()
