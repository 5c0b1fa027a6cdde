"""Ready-made studies: ``quick`` and ``lm-quick`` (offline, minutes on a CPU), ``paper``, ``resnet18-vs-34``..."""

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
from ..core import (
    BOOLEAN,
    PATH,
    SEED,
    Allowed,
    check_names,
    choice,
    fingerprint_data,
    folder_lock,
    integer,
    number,
    resolve_device,
)
from ..metrics import LAYER_MEASURES
from ..train import Recipe
from ._store import ResultStore, read_run_meta
from ._study import Study

__all__ = ["PRESETS", "Preset", "build_preset_study", "load_dataset", "open_preset_study", "run_preset", "zoo_models"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A study recipe: which networks (small ResNets or small GPT-2s), on which data, trained how.

    Attributes:
        name: the preset's name.
        description: one line for ``--help``.
        architectures: small-ResNet block counts (``"R1211"`` or tuples), or
            for language models the depth of each GPT-2 (``"L4"``: 4 blocks).
        width: channels of the first stage (the residual stream's size for GPT-2s).
        dataset: ``"digits"`` (offline, bundled with scikit-learn),
            ``"cifar10"`` or ``"pydoc"`` (English text that ships with
            Python, as bytes: `modelstitch.data.pydoc_corpus`).
        zoo_recipe: how each network is trained from scratch.
        recipe: how each stitch is trained.
        paper_recipe: how each stitch is trained with ``--paper-recipe``: the
            paper's recipe (`Recipe.paper`), at this preset's learning rate,
            batch size and epochs where they differ from the paper's.
        controls: add a random-weight control of every network.
        pairs: ``"all"`` (every ordered pair of trained networks),
            ``"cross"`` (only pairs of different networks) or ``"first"``
            (the first network with each other one, both ways); each network's
            self-stitch diagonal is still added as its sanity check.
        max_pairs: run only the first N of those ordered pairs (and their
            control pairs) unless the run asks for another number (``None``:
            all of them).
        limit: training samples used unless the run asks for another number
            (for language models: the stitches' training sequences; the
            networks train on the whole training split).
        test_limit: test samples used unless the run asks for another number.
        names: the networks' names (default: their architecture's, ``"R1211"``).
        seq_len: tokens per sequence (language models).
        share_suffix: the study's ``share_suffix`` (cells into one receiver
            layer run its suffix once per step, on their stitch outputs
            concatenated): on for ``quick`` and ``cifar-small``, whose cells
            it trains faster at the default's batch of 32 on a 2-core CPU,
            with the same results (docs/performance.md, "Sharing the
            suffix"); off elsewhere, unmeasured (it holds a whole receiver
            layer's cells' activations at once).
    """

    name: str
    description: str
    architectures: tuple[str | tuple[int, ...], ...]
    width: int
    dataset: str
    zoo_recipe: Recipe
    recipe: Recipe
    paper_recipe: Recipe = dataclasses.field(default_factory=Recipe.paper)
    controls: bool = True
    pairs: str = "all"
    max_pairs: int | None = None
    limit: int | None = None
    test_limit: int | None = None
    names: tuple[str, ...] | None = None
    seq_len: int = 64
    share_suffix: bool = False

    @property
    def language(self) -> bool:
        """Whether the networks are language models (GPT-2s on text)."""
        return self.dataset == "pydoc"

    def network_names(self) -> list[str]:
        """The name of each network of `architectures`, in order."""
        return list(self.names) if self.names else [zoo.architecture_name(b) for b in self.architectures]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "quick",
            "two narrow small ResNets and their random controls on offline 8x8 digits, the first into the "
            "second (--max-pairs 2: each into the other); one to two minutes on 2 CPU cores",
            ("R1111", "R1211"),
            width=8,
            dataset="digits",
            zoo_recipe=zoo.CLASSIFIER_RECIPE.replace(
                lr=0.05, batch_size=64, base_batch_size=64, epochs=4, channels_last=False
            ),
            recipe=Recipe(),
            paper_recipe=Recipe.paper(lr=0.01, batch_size=64, base_batch_size=64),
            pairs="cross",
            max_pairs=1,  # like the paper's figure: one trained pair and its random control
            share_suffix=True,
        ),
        Preset(
            "cifar-small",
            "R1111 and R1211 at width 16 and their controls on 4,000 CIFAR-10 training images, each into the "
            "other; about an hour on 2 CPU cores",
            ("R1111", "R1211"),
            width=16,
            dataset="cifar10",
            zoo_recipe=zoo.CLASSIFIER_RECIPE.replace(epochs=10, channels_last=False),
            recipe=Recipe(),
            paper_recipe=Recipe.paper(lr=0.01, batch_size=64, base_batch_size=64),
            pairs="cross",
            limit=4000,
            test_limit=2000,
            share_suffix=True,
        ),
        Preset(
            "lm-quick",
            "two 4-block GPT-2s of different seeds and a 3-block one, with random controls, trained here on "
            "Python's own help text as bytes; every block into every block; minutes on a CPU",
            ("L4", "L4", "L3"),
            width=64,
            dataset="pydoc",
            zoo_recipe=zoo.LM_RECIPE,
            # the former default recipe for one epoch: the image-classifier default was not measured on these
            recipe=Recipe(lr=0.01, momentum=0.9, warmup=0.1, holdout=0.15, batch_size=32, base_batch_size=32, epochs=1),
            paper_recipe=Recipe.paper(lr=0.01, batch_size=32, base_batch_size=32, epochs=1),
            pairs="first",
            limit=512,
            test_limit=128,
            names=("L4a", "L4b", "L3"),
        ),
        Preset(
            "paper",
            "all 16 small ResNets R1111..R2222 (width 64) and their controls on CIFAR-10 (the paper's networks; "
            "--paper-recipe for its exact stitch recipe)",
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
        name: ``"digits"``, ``"cifar10"`` or ``"pydoc"`` (`pydoc_corpus` as
            byte sequences of 64 tokens, the last tenth of the text the test split).
        train: the training split (else the test split).
        root: for CIFAR-10, a folder with ``train/<class>/`` and ``test/<class>/``
            images, or torchvision's CIFAR-10 folder.
        augment: random crop and flip (CIFAR-10 only).
        download: let torchvision download CIFAR-10 into ``root``.
    """
    if name == "digits":
        return ms_data.digits(train=train)
    if name == "pydoc":
        return ms_data.text_splits(ms_data.pydoc_corpus(), 64)[0 if train else 1]
    if name == "cifar10":
        if root is None:
            raise StitchError("CIFAR-10 needs --data-root DIR (an image folder copy, or where torchvision keeps it)")
        split = Path(root) / ("train" if train else "test")
        if split.is_dir():  # an image-folder copy: decoded once (and cached), batched as tensors
            return ms_data.cifar10_folder(root, train=train, augment=augment, decoded=True)
        return ms_data.cifar10(root, train=train, augment=augment, download=download)
    raise StitchError(f"unknown dataset {name!r}: use 'digits', 'cifar10' or 'pydoc'")


# ---------------------------------------------------------------- checking settings where they enter

INITS: tuple[str, ...] = ("lstsq", "random", "identity")
"""The stitch initialisations a study accepts (`Recipe.init`)."""

STUDY_MEASURES: tuple[str, ...] = ("stitch", *LAYER_MEASURES)
"""What a study computes for every cell: stitching and the similarity measures."""


def check_measures(value: Any, what: str, known: Sequence[str] = STUDY_MEASURES) -> tuple[str, ...]:
    """``value`` as a tuple of measure names from ``known``, none repeated.

    Raises:
        StitchError: not a list of names, empty, an unknown name (the message lists ``known``) or a repeat.
    """
    names = check_names(value, what, noun="measure", example=repr(list(known[:2])))
    unknown = [m for m in names if m not in known]
    if unknown:
        raise StitchError(f"{what} names {unknown[0]!r}, which is not a measure; choose from {tuple(known)}")
    return tuple(names)


def zoo_models(
    preset: Preset,
    *,
    out: Path,
    train_data: Any,
    test_data: Any,
    seed: int,
    device: torch.device,
    recipe: Recipe | None = None,
    epochs: float | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Train (or load from ``out/zoo``) each network of a preset, and build its random control.

    Network ``k`` starts from seed ``seed + k``; its control is the same
    architecture drawn from seed ``seed + 1000 + k`` and never trained.

    Returns:
        ``(models, controls)``: networks by name (controls named ``"<name> random"``)
        and the map from each network to its control.
    """
    recipe = (recipe or preset.zoo_recipe).replace(seed=seed, **({} if epochs is None else {"epochs": epochs}))
    models: dict[str, torch.nn.Module] = {}
    controls: dict[str, str] = {}
    training = {"recipe": repr(recipe), "width": preset.width, "data": fingerprint_data(train_data)}
    for k, (name, arch) in enumerate(zip(preset.network_names(), preset.architectures)):
        path = out / "zoo" / f"{name}.safetensors"
        model = _load_network(preset, path, arch) if path.is_file() else None
        if model is not None and model.checkpoint_metadata.get("training") != _jsonable(training):
            if progress:
                tqdm.write(f"{path} was trained with another recipe or data; training {name} again")
            model = None
        if model is None:
            model = _new_network(preset, arch, seed=seed + k)
            if progress:
                tqdm.write(f"training {name} (width {preset.width}) on {preset.dataset}")
            result = zoo.train_classifier(
                model, train_data, recipe=recipe, test_data=test_data, device=device, progress=progress
            )
            facts = {"dataset": preset.dataset, "test_accuracy": result["test_accuracy"], "seed": seed + k}
            if preset.language:
                zoo.save_language_model(
                    path, model, metadata={**facts, "test_loss": result["test_loss"], "training": training}
                )
            else:
                zoo.save_model(path, model, **facts, training=training)
        models[name] = model.eval()
        if preset.controls:
            control = f"{name} random"
            models[control] = _new_network(preset, arch, seed=seed + 1000 + k)
            controls[name] = control
    return models, controls


def _new_network(preset: Preset, arch: Any, *, seed: int) -> torch.nn.Module:
    """A randomly initialised network of the preset's family, drawn from ``seed``, in eval mode."""
    if preset.language:
        return zoo.tiny_gpt2(_depth(arch), width=preset.width, seq_len=preset.seq_len, seed=seed)
    return zoo.random_control(arch, seed=seed, width=preset.width)


def _load_network(preset: Preset, path: Path, arch: Any) -> torch.nn.Module:
    if not preset.language:
        return zoo.load_model(path, expected_architecture=arch)
    model = zoo.load_language_model(path)
    expected = f"gpt2-L{_depth(arch)}-W{preset.width}"
    if getattr(model, "architecture", None) != expected:
        raise StitchError(f"{path} holds a {model.architecture}, but {expected} was expected; use another folder")
    return model


def _depth(arch: Any) -> int:
    """The number of blocks of a language-model architecture name (``"L4"``: 4)."""
    if not (isinstance(arch, str) and arch[:1] == "L" and arch[1:].isdigit() and int(arch[1:]) > 0):
        raise StitchError(f"a language-model architecture is 'L<blocks>' (e.g. 'L4'), got {arch!r}")
    return int(arch[1:])


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from a checkpoint's JSON metadata."""
    return json.loads(json.dumps(value))


@dataclasses.dataclass(frozen=True)
class PresetOptions:
    """How to run a preset: the choices `run_preset` and ``modelstitch study run`` offer.

    Recorded in the run folder, so that `open_preset_study` (and ``study
    analyze``) set the same study up again.

    Attributes:
        data_root: CIFAR-10 location (an image-folder copy or torchvision's folder).
        download: let torchvision fetch CIFAR-10 into ``data_root``.
        seed: networks, controls, data order and every stitch.
        limit: use only this many training (and test) samples.
        epochs: override the epochs of both network and stitch training.
        max_pairs: run only the first N ordered pairs of trained networks (and
            their control pairs); rerun with a larger N to add the rest
            (``None``: the preset's own, `Preset.max_pairs`).
        measures: ``("stitch", "cka", ...)``, see `Study`.
        width: override the networks' width (channels of the first stage).
        batch_size: override the stitch recipe's batch size (the learning
            rate scales with it).
        init: override the stitch initialisation (``"random"``, ``"lstsq"``...).
        patience: stop each stitch once its held-out score has not improved for
            this many epochs (`Recipe.patience`).
        min_delta: with ``patience``, the rise in held-out accuracy that counts
            as an improvement (`Recipe.min_delta`).
        paper_recipe: train stitches with the paper's exact recipe
            (`Recipe.paper`: random init, the last epoch kept) at the preset's
            learning rate, batch size and epochs (`Preset.paper_recipe`).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for network and stitch
            training and evaluation (``None``: the recipes' own, bf16 autocast
            on CUDA and fp32 on the CPU).
        memory_budget: bytes of activation cache kept in memory (``0``: all of it on disk).
    """

    data_root: str | None = None
    download: bool = False
    seed: int = 0
    limit: int | None = None
    epochs: float | None = None
    max_pairs: int | None = None
    measures: tuple[str, ...] = ("stitch",)
    width: int | None = None
    batch_size: int | None = None
    init: str | None = None
    patience: int | None = None
    min_delta: float | None = None
    paper_recipe: bool = False
    precision: str | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        """Check every field by type and range, so that a bad option fails before any network trains.

        Raises:
            StitchError: ``"PresetOptions: <field> must be <allowed>, got <value>"``.
        """
        for field, allowed in _OPTIONS.items():
            allowed.check(getattr(self, field), f"PresetOptions: {field}")
        object.__setattr__(self, "measures", check_measures(self.measures, "PresetOptions: measures"))
        if self.data_root is not None:
            object.__setattr__(self, "data_root", str(self.data_root))
        if self.min_delta and self.patience is None:
            raise StitchError(
                f"PresetOptions: min_delta={self.min_delta!r} only applies with patience=N (epochs); set patience too"
            )

    def recipe(self, base: Recipe) -> Recipe:
        """``base`` with this run's seed, epochs and precision (and, for stitches, batch size)."""
        changes: dict[str, Any] = {"seed": self.seed}
        if self.epochs is not None:
            changes["epochs"] = self.epochs
        if self.precision is not None:
            changes.update(_PRECISIONS[self.precision])
        return base.replace(**changes)


_PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": False},
    "bf16": {"amp": True, "amp_dtype": "bfloat16"},
    "fp16": {"amp": True, "amp_dtype": "float16"},
}

_OPTIONS: dict[str, Allowed] = {
    "data_root": PATH.or_none("the preset's own data"),
    "download": BOOLEAN,
    "seed": SEED,
    "limit": integer(1).or_none("all samples"),
    "epochs": number(above=0).or_none("the recipes' own"),
    "max_pairs": integer(1).or_none("the preset's own"),
    "width": integer(1).or_none("the preset's"),
    "batch_size": integer(1).or_none("the recipe's"),
    "init": choice(INITS).or_none("the recipe's"),
    "patience": integer(1).or_none("all epochs"),
    "min_delta": number(at_least=0, below=1).or_none("the recipe's"),
    "paper_recipe": BOOLEAN,
    "precision": choice(tuple(_PRECISIONS)).or_none("the recipes' own"),
    "memory_budget": integer(0).or_none("the Study's default"),
}
"""How each field of `PresetOptions` but ``measures`` is checked."""


def build_preset_study(
    name: str,
    *,
    out: str | Path,
    options: PresetOptions | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    **settings: Any,
) -> Study:
    """Train (or load from ``out/zoo``) a preset's networks and set up its `Study` without running it.

    Args:
        name: a key of `PRESETS`.
        out: the run folder.
        options: how to run it; or pass its fields as keywords (``limit=256``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: show progress bars.
        **settings: the fields of `PresetOptions`, when ``options`` is not given.
    """
    if name not in PRESETS:
        raise StitchError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if options is None:
        try:
            options = PresetOptions(**settings)
        except TypeError as err:
            raise StitchError(f"build_preset_study: {err}; the options are {_option_names()}") from None
    elif settings:
        raise StitchError("pass either options=PresetOptions(...) or its fields as keywords, not both")
    preset = PRESETS[name]
    if options.data_root is not None and preset.dataset != "cifar10":
        raise StitchError(
            f"preset {name!r} runs on bundled {preset.dataset} data and reads no --data-root; drop it, or choose a "
            "CIFAR-10 "
            f"preset ({', '.join(sorted(p.name for p in PRESETS.values() if p.dataset == 'cifar10'))})"
        )
    if options.width is not None:
        preset = dataclasses.replace(preset, width=options.width)
    out = Path(out)
    dev = resolve_device(device)
    zoo_recipe, recipe = options.recipe(preset.zoo_recipe), _stitch_recipe(options, preset)  # before any work
    root, download, seed = options.data_root, options.download, options.seed
    train_aug = load_dataset(preset.dataset, train=True, root=root, augment=True, download=download)
    train = load_dataset(preset.dataset, train=True, root=root, download=download)
    test = load_dataset(preset.dataset, train=False, root=root, download=download)
    limit = options.limit if options.limit is not None else preset.limit
    test_limit = options.limit if options.limit is not None else preset.test_limit
    train = ms_data.subset(train, limit, seed=seed)
    if not preset.language:  # language models train on the whole split; their stitches on `limit` sequences
        train_aug = ms_data.subset(train_aug, limit, seed=seed)
    test = ms_data.subset(test, test_limit, seed=seed)
    models, controls = zoo_models(
        preset,
        out=out,
        train_data=train_aug,
        test_data=test,
        seed=seed,
        device=dev,
        recipe=zoo_recipe,
        progress=progress,
    )
    trained = [n for n in models if n not in controls.values()]
    pairs: Any = [(a, b) for a in trained for b in trained if preset.pairs == "all" or a != b]
    if preset.pairs == "first":
        pairs = [(a, b) for a, b in pairs if trained[0] in (a, b)]
    max_pairs = options.max_pairs if options.max_pairs is not None else preset.max_pairs
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    extra = {"memory_budget": options.memory_budget} if options.memory_budget is not None else {}
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
        measures=options.measures,
        share_suffix=preset.share_suffix,
        **extra,
    )
    record = {"name": name, "dataset": preset.dataset, **dataclasses.asdict(options)}
    with folder_lock(out), ResultStore(study.store_path) as store:
        store.set_meta("preset", record)
    return study


def _stitch_recipe(options: PresetOptions, preset: Preset) -> Recipe:
    """The stitch recipe of a preset run: the preset's (or its paper recipe) with the run's options."""
    recipe = options.recipe(preset.paper_recipe if options.paper_recipe else preset.recipe)
    if options.init is not None:
        recipe = recipe.replace(init=options.init)
    if options.patience is not None:
        recipe = recipe.replace(patience=options.patience)
    if options.min_delta is not None:
        recipe = recipe.replace(min_delta=options.min_delta)
    if options.batch_size is not None:
        recipe = recipe.replace(batch_size=options.batch_size)
    return recipe


def _option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PresetOptions)]


def open_preset_study(out: str | Path, *, device: str | torch.device | None = "auto", progress: bool = True) -> Study:
    """Set up again the study of a run folder made by `run_preset` (networks from ``out/zoo``)."""
    record = read_run_meta(out, "preset")
    if record is None:
        raise StitchError(f"{out} was not made from a preset; set the Study up in Python and pass it instead")
    options = PresetOptions(**{k: v for k, v in record.items() if k in _option_names()})
    return build_preset_study(record["name"], out=out, options=options, device=device, progress=progress)


def run_preset(
    name: str,
    *,
    out: str | Path,
    options: PresetOptions | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    run_options: dict[str, Any] | None = None,
    **settings: Any,
) -> Study:
    """Train the zoo of a preset (or reuse it), run its study, write the CSV and heatmaps.

    Rerunning with the same ``out`` resumes: trained networks and finished
    cells are reused.

    Args:
        name: a key of `PRESETS`.
        out: the run folder.
        options: how to run it (`PresetOptions`); or pass its fields as
            keywords, e.g. ``run_preset("quick", out="runs/q", limit=256)``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: show progress bars.
        run_options: passed to `Study.run` (``executor``, ``address``,
            ``retry_failed``, ``keep_going``, ``wait``...).
        **settings: the fields of `PresetOptions`.

    Returns:
        The finished `Study`.
    """
    study = build_preset_study(name, out=out, options=options, device=device, progress=progress, **settings)
    study.run(progress=progress, **(run_options or {}))  # writes cells.csv too
    if PRESETS[name].language:  # loss recovered (mean ablation) is the language-model literature's score
        study.plot(value="loss_recovered_mean")
        study.plot(study.out / "heatmaps-accuracy")
    else:
        study.plot()
    if len(study.measures) > 1:
        study.plot_measures()
    return study
