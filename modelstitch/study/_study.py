"""`Study`: every cell (sender, sender layer, receiver, receiver layer) over pairs of networks.

Cells of one ordered pair of networks train together (one pass over the data
and one activation cache of the sender) and
their results are written to the `ResultStore` in one transaction. A rerun
skips finished pairs, so killing the process at any moment loses at most the
pair in progress, and every cell's result is the same as in an uninterrupted
run: a cell's stitch is initialised from a seed derived from the study seed
and the cell's names, and each pair always trains the same set of cells.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
import uuid
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from .._errors import StitchError, StitchWarning
from .._version import __version__
from ..core import (
    BOOLEAN,
    SEED,
    check_names,
    choice,
    fingerprint_data,
    fingerprint_module,
    folder_lock,
    integer,
    layer_specs,
    load_checkpoint,
    parse_address,
    resolve_device,
    save_checkpoint,
    split_batch,
    suffix,
    to_device,
)
from ..metrics import LAYER_MEASURES, LAYER_RULES, compare_layers
from ..stitches import STITCH_KINDS, StitchedModel, assemble
from ..train import (
    OBJECTIVES,
    Recipe,
    evaluate_stitches,
    fit_least_squares_all,
    holdout_split,
    score_stitches,
    task_of,
    train_stitches,
)
from ..zoo import layer_names
from ._results import SANITY_TOLERANCE, StudyResults, slug
from ._store import SCORE_COLUMNS, ResultStore

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["Cell", "Study"]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One stitch of a study: sender layer ``i`` of ``sender`` into layer ``j`` of ``receiver``."""

    sender: str
    sender_layer: str
    receiver: str
    receiver_layer: str
    objective: str = "task"

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """The cell's primary key in the results store."""
        return (self.sender, self.sender_layer, self.receiver, self.receiver_layer, self.objective)

    def seed(self, study_seed: int) -> int:
        """The seed of this cell's stitch initialisation (stable across runs and machines)."""
        return zlib.crc32(repr((study_seed, *self.key)).encode()) & 0x7FFFFFFF


class Study:
    """A grid of stitching cells over ordered pairs of networks, with a resumable store.

    Args:
        models: networks by name, e.g. ``{"R1111": net, "R1111-random": control}``.
            They stay frozen and are never modified.
        train_data: Dataset or DataLoader of ``(inputs, labels)`` to train stitches on
            (no random augmentation when ``cache=True``).
        test_data: Dataset or DataLoader to measure accuracy on.
        out: the run folder; results go to ``out/study.sqlite``.
        pairs: ``"all"`` (every ordered pair of the networks not listed as
            controls, the self-pairs included) or a list of ``(sender, receiver)``.
        layers: the layers of each network, by name (index 0 first); by default
            `zoo.layer_names` of each network (small ResNets, torchvision ResNets).
        controls: ``{network: its random-weight control}``; for each pair
            ``(a, b)`` the pair ``(controls[a], controls[b])`` is studied too.
        recipe: how each stitch trains (`Recipe`; ``Recipe()`` by default,
            ``Recipe.paper()`` is the paper's).
        objective: ``"task"`` or ``"mse"`` (see `train_stitch`).
        kind: stitch kind (see `make_stitch`).
        init: ``"random"``, ``"identity"`` or ``"lstsq"``; ``None`` (default)
            takes ``recipe.init`` (least squares, fitted on the training part
            in one pass for all cells of a pair). Least squares needs linear
            stitches: with another ``kind`` the default falls back to random.
        seed: seeds every cell's stitch initialisation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        cache: train from cached sender activations (see `train_stitches`).
        memory_budget: bytes of activation cache kept in memory.
        example_input: a batch like the data, for probing shapes; by default
            the first training sample.
        eval_batch_size: batch size of the evaluation pass.
        share_suffix: run each receiver suffix once per step for all cells
            that stitch into the same receiver layer (see `train_stitches`).
        cache_dtype: dtype of cached activations (see `train_stitches`).
        measures: what to compute for every cell: ``"stitch"`` (train and
            evaluate the stitch) and any similarity measures of
            `modelstitch.metrics.LAYER_MEASURES` (``"cka"``, ``"pwcca"``, ...),
            computed on the test data from one forward of both networks per
            batch, and stored beside the stitching results.
        sanity: add, for every trained network whose self-pair the study
            does not already have, its self-stitch diagonal (each layer into
            itself, where the identity is an exact solution): the check that
            stitching finds a stitch when one exists (see `self_stitch`).
        measure_rule: how maps and tokens become feature vectors for the
            measures (see `modelstitch.metrics.compare_layers`; ``None`` picks
            per measure).
        scores: what each cell's test evaluation stores: ``"accuracy"``
            (accuracy and loss, one pass) or ``"all"`` (also every score of
            `modelstitch.train.score_stitches`: the receiver's own loss, loss
            recovered against zero and mean ablation, KL, agreement and FVU;
            three passes). ``"auto"`` (default): ``"all"`` when a receiver is
            a causal language model, else ``"accuracy"``.
        score_start: also evaluate each cell's least-squares start on the test
            data before training (the ``init_accuracy`` column; empty
            otherwise). Off by default: with the one-epoch default recipe it
            is about a seventh of a study's time (docs/performance.md).

    Examples:
        >>> from modelstitch import zoo, data
        >>> nets = {"A": zoo.small_resnet("R1111", width=4), "B": zoo.small_resnet("R1111", width=4)}
        >>> import tempfile
        >>> study = Study(nets, train_data=data.subset(data.digits(), 64), test_data=data.subset(
        ...     data.digits(train=False), 64), out=tempfile.mkdtemp(), pairs=[("A", "B")],
        ...     layers={"A": ["stem", "layer4.0"], "B": ["layer1.0", "layer3.0", "layer4.0"]},
        ...     recipe=Recipe(batch_size=32, epochs=1), device="cpu")
        >>> len(study.cells())  # 2 x 3 cells of A -> B, and the self-stitch diagonals of A (2) and B (3)
        11
        >>> study.run(progress=False).matrix("A", "B").shape
        (2, 3)
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        train_data: Any,
        test_data: Any,
        out: str | Path,
        pairs: str | Sequence[tuple[str, str]] = "all",
        layers: Mapping[str, Sequence[str]] | None = None,
        controls: Mapping[str, str] | None = None,
        recipe: Recipe | None = None,
        objective: str = "task",
        kind: str = "auto",
        init: str | None = None,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        cache: bool = True,
        memory_budget: int = 2 * 1024**3,
        example_input: Any = None,
        eval_batch_size: int = 256,
        share_suffix: bool = False,
        cache_dtype: torch.dtype | None = None,
        measures: Sequence[str] = ("stitch",),
        measure_rule: str | None = None,
        sanity: bool = True,
        scores: str = "auto",
        score_start: bool = False,
    ) -> None:
        if not isinstance(models, Mapping) or not models:
            raise StitchError("a Study needs at least one network in models={name: module}")
        if recipe is not None and not isinstance(recipe, Recipe):
            raise StitchError(f"Study: recipe must be a modelstitch.Recipe, got {type(recipe).__name__}")
        for name, value, allowed in (
            ("objective", objective, choice(OBJECTIVES)),
            ("kind", kind, choice(STITCH_KINDS)),
            ("init", init, choice(("random", "identity", "lstsq")).or_none("the recipe's")),
            ("seed", seed, SEED),
            ("cache", cache, BOOLEAN),
            ("share_suffix", share_suffix, BOOLEAN),
            ("sanity", sanity, BOOLEAN),
            ("score_start", score_start, BOOLEAN),
            ("memory_budget", memory_budget, integer(0)),
            ("eval_batch_size", eval_batch_size, integer(1)),
            ("scores", scores, choice(("auto", "accuracy", "all"))),
        ):
            allowed.check(value, f"Study: {name}")
        self.models = dict(models)
        self.controls = dict(controls or {})
        for name in [*self.controls, *self.controls.values()]:
            self._check_name(name, "controls")
        for name, control in self.controls.items():
            if name == control:
                raise StitchError(
                    f"controls maps {name!r} to itself; a control is another network: its random-weight twin "
                    f"(e.g. zoo.random_control(models[{name!r}]))"
                )
        for name in layers or {}:
            self._check_name(name, "layers")
        self.train_data = train_data
        self.test_data = test_data
        self.out = Path(out)
        self.recipe = recipe or Recipe()
        self.objective = objective
        self.kind = kind
        self.init = init or self.recipe.init
        if self.init == "lstsq" and kind not in ("auto", "linear"):
            if init is not None:
                raise StitchError(f"init='lstsq' needs kind='linear' stitches, not kind={kind!r}; use init='random'")
            self.init = "random"
        self.seed = seed
        self.device = resolve_device(device)
        self.cache = cache
        self.memory_budget = memory_budget
        self.eval_batch_size = eval_batch_size
        self.share_suffix = share_suffix
        self.cache_dtype = cache_dtype
        self.score_start = score_start
        self._fingerprints: dict[str, Any] | None = None
        self._on_step: _CellProgress | None = None
        self.measures = tuple(dict.fromkeys(measures))
        known = ("stitch", *LAYER_MEASURES)
        if not self.measures or any(m not in known for m in self.measures):
            raise StitchError(f"measures={tuple(measures)!r}: choose from {known}")
        if measure_rule is not None and measure_rule not in LAYER_RULES:
            raise StitchError(f"measure_rule={measure_rule!r}: choose None or one of {list(LAYER_RULES)}")
        self.measure_rule = measure_rule
        self.layers = {name: list(self._layers_of(name, layers)) for name in self.models}
        self.pairs = self._expand_pairs(pairs)
        self.sanity_pairs: list[tuple[str, str]] = []
        if sanity:
            trained = dict.fromkeys(a for pair in self.pairs for a in pair if a not in set(self.controls.values()))
            self.sanity_pairs = [(n, n) for n in trained if (n, n) not in self.pairs]
            self.pairs += self.sanity_pairs
        self._check_controls()
        if not self.cells():
            raise StitchError(
                f"this study has no cells: pairs={pairs!r} with controls {self.controls} leaves no (sender, receiver) "
                "pair of trained networks; name the pairs, or networks that are not all controls"
            )
        self.example_input = example_input if example_input is not None else _first_input(train_data)
        receivers = {b for _, b in self.pairs}
        if scores == "auto":
            scores = "all" if any(task_of(self.models[b]).causal for b in receivers) else "accuracy"
        self.scores = scores

    # ------------------------------------------------------------------ layout

    def _check_name(self, name: str, where: str) -> None:
        if name not in self.models:
            raise StitchError(f"{where} names {name!r}, which is not in models ({sorted(self.models)})")

    def _layers_of(self, name: str, layers: Mapping[str, Sequence[str]] | None) -> Sequence[str]:
        if layers is not None and name in layers:
            return _checked_layers(name, self.models[name], layers[name])
        try:
            return layer_names(self.models[name])
        except StitchError as err:
            raise StitchError(
                f"network {name!r}: pass layers={{{name!r}: [...]}} to say which layers to stitch ({err})"
            ) from None

    def _expand_pairs(self, pairs: str | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        if pairs == "all":
            trained = [n for n in self.models if n not in set(self.controls.values())]
            base = [(a, b) for a in trained for b in trained]
        elif isinstance(pairs, str):
            raise StitchError(f"pairs={pairs!r}: use 'all' or a list of (sender, receiver) names")
        else:
            base = [tuple(p) for p in pairs]
        out: list[tuple[str, str]] = []
        for a, b in base:
            self._check_name(a, "pairs")
            self._check_name(b, "pairs")
            out.append((a, b))
            if a in self.controls and b in self.controls:
                out.append((self.controls[a], self.controls[b]))
        return list(dict.fromkeys(out))

    def cells(self) -> list[Cell]:
        """Every cell of the study, pair by pair, sender layer then receiver layer."""
        return [cell for pair in self.pairs for cell in self._pair_cells(*pair)]

    def _pair_cells(self, a: str, b: str, objective: str | None = None) -> list[Cell]:
        objective = objective or self.objective
        if (a, b) in self.sanity_pairs:  # the self-stitch diagonal only
            return [Cell(a, layer, b, layer, objective) for layer in self.layers[a]]
        return [Cell(a, sl, b, rl, objective) for sl in self.layers[a] for rl in self.layers[b]]

    def _check_controls(self) -> None:
        """Warn when a control is not the same architecture as the network it controls."""
        for name, control in self.controls.items():
            shapes = {k: tuple(v.shape) for k, v in self.models[name].state_dict().items()}
            control_shapes = {k: tuple(v.shape) for k, v in self.models[control].state_dict().items()}
            if shapes != control_shapes:
                warnings.warn(
                    f"control {control!r} does not have the architecture (parameter names and shapes) of {name!r}, "
                    "so it does not measure what stitching into a random network of that architecture gives",
                    StitchWarning,
                    stacklevel=3,
                )

    def sibling(self, *, objective: str | None = None, recipe: Recipe | None = None) -> Study:
        """The same networks, cells, data and folder with another objective or recipe.

        Its cells are stored beside this study's (the objective is part of each
        cell's key), e.g. ``study.sibling(objective="mse", recipe=Recipe(epochs=30))``.
        """
        twin = copy.copy(self)
        twin.objective = objective or self.objective
        twin.recipe = recipe or self.recipe
        twin.measures = ("stitch",)  # similarity measures do not depend on the objective: stored once
        return twin

    @property
    def store_path(self) -> Path:
        """The SQLite file of this study's results."""
        return self.out / "study.sqlite"

    def config(self) -> dict[str, Any]:
        """What defines the study's results; a rerun in the same folder must match it."""
        return {
            "models": sorted(self.models),
            "layers": self.layers,
            "controls": self.controls,
            "objective": self.objective,
            "kind": self.kind,
            "init": self.init,
            "seed": self.seed,
            # every field, defaults too: a default that changes between versions changes the results
            "recipe": {f.name: repr(getattr(self.recipe, f.name)) for f in dataclasses.fields(self.recipe)},
            "cache_dtype": None if self.cache_dtype is None else str(self.cache_dtype),
            "measures": list(self.measures),
            "sanity_pairs": [list(p) for p in self.sanity_pairs],
            "measure_rule": self.measure_rule,
            "fingerprints": self.fingerprints(),
            "pairs": [list(p) for p in self.pairs],
        }

    def fingerprints(self) -> dict[str, Any]:
        """What the results rest on besides the settings: each network's weights, the data, the numerics.

        Computed once per study: a hash of every network's state dict, the
        size, sampled items and transform of the training and test data, and
        the device kind, precision and parameter dtypes the cells run with.
        """
        if self._fingerprints is None:
            self._fingerprints = {
                "networks": {name: fingerprint_module(net) for name, net in sorted(self.models.items())},
                "train_data": fingerprint_data(self.train_data),
                "test_data": fingerprint_data(self.test_data),
                "numerics": {
                    "device": self.device.type,
                    "amp": self.recipe.amp_dtype if self.recipe.uses_amp(self.device) else None,
                    "dtypes": sorted({str(p.dtype) for net in self.models.values() for p in net.parameters()}),
                },
            }
        return self._fingerprints

    # ------------------------------------------------------------------ running

    def run(
        self,
        *,
        progress: bool = True,
        executor: str = "local",
        address: str | None = None,
        max_retries: int = 2,
        retry_failed: bool = False,
        cpus_per_task: float = 1,
        keep_going: bool = False,
        wait: bool = False,
    ) -> Study:
        """Train and evaluate every unfinished cell; finished pairs are skipped.

        Writes ``out/study.sqlite`` (every finished cell), ``out/stitches/``
        (the trained stitch weights) and ``out/cells.csv`` (the table of
        `to_csv` and `to_pandas`, rewritten when a run completes). It draws
        no figures: `plot` and `plot_measures` do (``modelstitch study run``
        calls them after the run).

        Args:
            progress: show a progress bar over cells, with an ETA.
            executor: ``"local"`` (this process) or ``"ray"`` (each pair a Ray
                task; needs ``pip install "modelstitch[ray]"``). Either way only
                this process writes the store, as results arrive.
            address: the Ray cluster to join (``None``: start a local one).
            max_retries: retries of a pair that ran out of device memory (or
                whose Ray worker died) before it is recorded as failed.
            retry_failed: also run pairs that failed before (otherwise they are
                skipped and listed by `failures`).
            cpus_per_task: CPUs per Ray task.
            keep_going: record a pair that raises (see `failures`) and go on;
                by default it stops the study with the pair named.
            wait: if another process is running in the same folder, wait
                for it instead of failing.

        Returns:
            ``self``, for chaining (``study.run().matrix(a, b)``). Pairs that
            ran out of memory (after retries), and with ``keep_going`` pairs
            that raised, are recorded in the store (see `failures`).

        Raises:
            StitchError: a pair raised and ``keep_going`` is False (finished
                pairs are kept, so a rerun resumes); the folder holds a study
                with other settings, networks, data or numerics (the message
                says what differs); or another process holds the folder.
        """
        from ._executors import EXECUTORS, PairFailure, run_local, run_ray

        if executor not in EXECUTORS:
            raise StitchError(f"executor={executor!r}: use one of {EXECUTORS}")
        with folder_lock(self.out, wait=wait), ResultStore(self.store_path) as store:
            config = self.config()
            for key in (f"config:{self.objective}", "config"):
                store.update_meta(key, lambda saved, key=key: _merge_config(saved, config, key, self.store_path))
            self._remove_orphan_weights(store)
            failed = {(f["sender"], f["receiver"]) for f in store.failures(self.objective)}
            missing = self._missing(store)
            pending = [p for p in self.pairs if p in missing and (retry_failed or p not in failed)]
            total = sum(len(self._pair_cells(*p)) for p in pending)
            if executor == "ray":
                outcomes = run_ray(
                    self,
                    pending,
                    address=address,
                    max_retries=max_retries,
                    cpus_per_task=cpus_per_task,
                    keep_going=keep_going,
                )
            else:
                outcomes = run_local(self._run_pair, pending, keep_going=keep_going, max_retries=max_retries)
            with tqdm(
                total=total,
                desc="cells",
                unit="cell",
                disable=not progress,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            ) as bar:
                self._on_step = _CellProgress(bar) if progress and executor == "local" else None
                for (a, b), outcome in outcomes:
                    if isinstance(outcome, PairFailure):
                        store.add_failure(a, b, self.objective, outcome.error, outcome.attempts)
                        bar.write(f"failed: {a} -> {b}: {outcome.error.splitlines()[-1]}")
                    else:
                        self._commit_pair(store, a, b, *outcome)
                    bar.set_postfix_str(f"{a} -> {b}")
                    moved = 0.0 if self._on_step is None else self._on_step.moved
                    bar.update(len(self._pair_cells(a, b)) - moved)
                    if self._on_step is not None:
                        self._on_step.moved = 0.0
                self._on_step = None
            self._record_network_accuracy(store)
            store.to_csv(self.out / "cells.csv")  # the tidy table, as `to_csv`; figures are drawn by `plot`
        failed = {n: s for n, s in self.results.self_stitch().items() if s["failed"]}
        if failed:
            worst = ", ".join(f"{n} {s['floor']:+.3f} at {s['worst_layer']}" for n, s in failed.items())
            warnings.warn(
                f"self-stitches failed their sanity check (more than {SANITY_TOLERANCE:.0%} below the network's own "
                f"accuracy): {worst}. A stitch exists there (the identity) but training did not find it, so low "
                "cells of this study may mean 'not found', not 'dissimilar'; see docs/trust.md",
                StitchWarning,
                stacklevel=2,
            )
        return self

    def _record_network_accuracy(self, store: ResultStore) -> None:
        """Each network's own test accuracy, stored once per network fingerprint (the self-stitch reference)."""
        fingerprints = self.fingerprints()["networks"]
        saved = store.meta("network_accuracy") or {}
        for name, net in self.models.items():
            if saved.get(name, {}).get("fingerprint") != fingerprints[name]:
                (result,) = self._evaluate([net])
                saved[name] = {"accuracy": result["accuracy"], "fingerprint": fingerprints[name]}
        store.set_meta("network_accuracy", saved)

    def failures(self) -> list[dict[str, Any]]:
        """Pairs of this objective that failed: sender, receiver, error, attempts."""
        with ResultStore(self.store_path) as store:
            return store.failures(self.objective)

    def _missing(self, store: ResultStore) -> set[tuple[str, str]]:
        """Pairs with a cell or a measure value not yet in the store."""
        done = store.done()
        measured = {(r["sender"], r["sender_layer"], r["receiver"], r["receiver_layer"], r["measure"])
                    for r in store.measures()}  # fmt: skip
        wanted = [m for m in self.measures if m != "stitch"]
        missing = set()
        for pair in self.pairs:
            for cell in self._pair_cells(*pair):
                names = (cell.sender, cell.sender_layer, cell.receiver, cell.receiver_layer)
                if ("stitch" in self.measures and cell.key not in done) or any(
                    (*names, m) not in measured for m in wanted
                ):
                    missing.add(pair)
                    break
        return missing

    def _commit_pair(
        self,
        store: ResultStore,
        a: str,
        b: str,
        rows: list[dict[str, Any]],
        weights: dict[str, torch.Tensor],
        measures: list[dict[str, Any]],
    ) -> None:
        """Write a pair's stitch weights under a fresh name, then its rows (naming that file) in one transaction."""
        name = None
        if weights:
            name = f"{slug(a)}__{slug(b)}__{self.objective}.{uuid.uuid4().hex[:12]}.safetensors"
            meta = {"sender": a, "receiver": b, "objective": self.objective, "recipe": repr(self.recipe)}
            save_checkpoint(self.out / "stitches" / name, weights, meta)
        rows = [{**row, "weights": name} for row in rows]
        store.add(rows, measures=measures, clear_failure=(a, b, self.objective))
        self._remove_orphan_weights(store, (a, b))

    def _remove_orphan_weights(self, store: ResultStore, pair: tuple[str, str] | None = None) -> None:
        """Delete stitch files no stored cell refers to (left by a kill between the two writes, or replaced)."""
        folder = self.out / "stitches"
        if not folder.is_dir():
            return
        used = {row["weights"] for row in store.rows()}
        pattern = "*.safetensors" if pair is None else f"{slug(pair[0])}__{slug(pair[1])}__*.safetensors"
        for path in folder.glob(pattern):
            if path.name not in used:
                path.unlink(missing_ok=True)

    def stitch_path(self, sender: str, receiver: str, objective: str | None = None) -> Path:
        """The file that holds the trained stitches of one finished ordered pair (safetensors).

        Raises:
            StitchError: the pair has not finished with that objective.
        """
        objective = objective or self.objective
        with ResultStore(self.store_path) as store:
            rows = store.rows(sender=sender, receiver=receiver, objective=objective)
        names = {row["weights"] for row in rows}
        if len(names) != 1 or None in names:
            raise StitchError(
                f"no trained stitches for {sender} -> {receiver} ({objective}): that pair has not finished"
            )
        return self.out / "stitches" / names.pop()

    def load_cells(self, sender: str, receiver: str, objective: str | None = None) -> dict[Cell, StitchedModel]:
        """The trained stitched models of one finished pair, rebuilt from the saved stitch weights.

        Returns:
            ``{cell: stitched model}`` for every cell of the pair, in eval mode.

        Raises:
            StitchError: the pair has not been run with that objective.
        """
        objective = objective or self.objective
        path = self.stitch_path(sender, receiver, objective)
        weights, _ = load_checkpoint(path)
        built = self._build_pair(sender, receiver, objective)
        out = {}
        for cell, m in built:
            prefix = f"{m.sender_layer}->{m.receiver_layer}."
            m.stitch.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
            out[cell] = m.eval()
        return out

    def _build_pair(self, a: str, b: str, objective: str, init: str | None = None) -> list[tuple[Cell, StitchedModel]]:
        """The pair's cells, each stitch seeded and started as ``init`` says (by default: at random when the study
        fits least squares itself, else at the study's start)."""
        sender, receiver = self.models[a].to(self.device), self.models[b].to(self.device)
        example = to_device(self.example_input, self.device)  # a tensor, or a dict of them (a HuggingFace batch)
        specs_a = self._specs(sender, a, example)
        specs_b = self._specs(receiver, b, example)
        suffixes = {rl: suffix(receiver, rl, example_input=example) for rl in self.layers[b]}
        built = []
        for cell in self._pair_cells(a, b, objective):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cell.seed(self.seed))
                stitched = assemble(
                    sender,
                    receiver,
                    specs_a[cell.sender_layer],
                    specs_b[cell.receiver_layer],
                    suffixes[cell.receiver_layer],
                    kind=self.kind,
                    init=init or ("random" if self.init == "lstsq" else self.init),
                )
            built.append((cell, stitched))
        return built

    def _run_pair(self, a: str, b: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], list[dict[str, Any]]]:
        measures = self._measure_pair(a, b)
        if "stitch" not in self.measures:
            return [], {}, measures
        rows, weights = self._stitch_pair(a, b)
        return rows, weights, measures

    def _measure_pair(self, a: str, b: str) -> list[dict[str, Any]]:
        """The similarity measures of every cell of a pair, from one pass over the test data."""
        wanted = [m for m in self.measures if m != "stitch"]
        if not wanted:
            return []
        matrices = compare_layers(
            self.models[a],
            self.layers[a],
            self.models[b],
            self.layers[b],
            self.test_data,
            measures=wanted,
            rule=self.measure_rule,
            batch_size=self.eval_batch_size,
            device=self.device,
            positions=self.recipe.positions,
        )
        return [
            {"sender": a, "sender_layer": sl, "receiver": b, "receiver_layer": rl, "measure": m, "value": float(v)}
            for m, matrix in matrices.items()
            for (i, sl), (j, rl) in itertools.product(enumerate(self.layers[a]), enumerate(self.layers[b]))
            for v in [matrix[i, j]]
        ]

    def _stitch_pair(self, a: str, b: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        # least-squares starts are fitted by training (in the pass that fills its cache), unless they are scored first
        lstsq = self.init == "lstsq"
        built = self._build_pair(a, b, self.objective, init="auto" if lstsq else None)
        cells = [cell for cell, _ in built]
        stitched = [m for _, m in built]
        start = time.perf_counter()
        train, held = self.train_data, None
        if self.objective == "task":
            train, held = holdout_split(train, self.recipe.holdout, seed=self.recipe.seed)
        init_results = None
        if lstsq and self.score_start:  # fitted here, so training keeps these starts
            fit_least_squares_all(
                stitched, train, batch_size=self.eval_batch_size, device=self.device, positions=self.recipe.positions
            )
            init_results = self._evaluate(stitched)
        results = train_stitches(
            stitched,
            train,
            holdout=held,
            objective=self.objective,  # type: ignore[arg-type]
            recipe=self.recipe.replace(init="lstsq") if lstsq else self.recipe,
            device=self.device,
            progress=False,
            cache=self.cache,
            memory_budget=self.memory_budget,
            share_suffix=self.share_suffix,
            cache_dtype=self.cache_dtype,
            on_step=None if self._on_step is None else self._on_step.for_cells(len(cells)),
        )
        evaluation = self._evaluate(stitched, scores=self.scores)
        seconds = (time.perf_counter() - start) / len(cells)
        rows = []
        for k, (cell, result, ev) in enumerate(zip(cells, results, evaluation)):
            rows.append(
                {
                    **dict(zip(("sender", "sender_layer", "receiver", "receiver_layer", "objective"), cell.key)),
                    "sender_index": self.layers[a].index(cell.sender_layer),
                    "receiver_index": self.layers[b].index(cell.receiver_layer),
                    "sender_depth": len(self.layers[a]) - 1,
                    "receiver_depth": len(self.layers[b]) - 1,
                    "accuracy": ev["accuracy"],
                    "loss": ev["loss"],
                    "train_loss": result.final_loss,
                    "selected_epoch": result.selected_epoch,
                    "holdout_accuracy": result.holdout_accuracy,
                    "convergence": result.convergence,
                    "init_accuracy": None if init_results is None else init_results[k]["accuracy"],
                    **{c: ev.get(c) for c in SCORE_COLUMNS},
                    "seconds": seconds,
                    "seed": cell.seed(self.seed),
                    "recipe": repr(self.recipe),
                    "version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
        weights = {
            f"{m.sender_layer}->{m.receiver_layer}.{k}": v.detach().cpu()
            for m in stitched
            for k, v in m.stitch.state_dict().items()
        }
        return rows, weights

    def _specs(self, model: nn.Module, name: str, example: Any) -> dict[str, Any]:
        try:
            return {s.name: s for s in layer_specs(model, example, self.layers[name])}
        except StitchError as err:
            raise StitchError(f"network {name!r}: {err}") from None

    def _evaluate(self, stitched: Sequence[nn.Module], scores: str = "accuracy") -> list[dict[str, float]]:
        if scores == "all":
            return score_stitches(
                stitched,  # type: ignore[arg-type]
                self.test_data,
                device=self.device,
                batch_size=self.eval_batch_size,
                recipe=self.recipe,
                what="the study's test data",
                positions=self.recipe.positions,
            )
        return evaluate_stitches(
            stitched,
            self.test_data,
            device=self.device,
            batch_size=self.eval_batch_size,
            recipe=self.recipe,
            what="the study's test data",
        )

    # ------------------------------------------------------------------ results

    @property
    def results(self) -> StudyResults:
        """The finished cells of this study (read from its store)."""
        return StudyResults(self.out, self.config(), self.pairs)

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Finished cells as dicts (see `StudyResults.rows`)."""
        return self.results.rows(**where)

    def matrix(self, sender: str, receiver: str, *, value: str = "accuracy") -> np.ndarray:
        """The ``[I, J]`` similarity matrix of one ordered pair (see `StudyResults.matrix`)."""
        return self.results.matrix(sender, receiver, value=value)

    def to_csv(self, path: str | Path | None = None) -> Path:
        """Write the tidy table of finished cells (default ``out/cells.csv``; `run` writes it too)."""
        return self.results.to_csv(path)

    def to_pandas(self) -> pd.DataFrame:
        """The finished cells as a pandas DataFrame, the columns of ``cells.csv`` (see `StudyResults.to_pandas`)."""
        return self.results.to_pandas()

    def plot_measures(self, path: str | Path | None = None, **kwargs: Any) -> Figure:
        """Stitching beside each similarity measure (see `StudyResults.plot_measures`)."""
        return self.results.plot_measures(path, **kwargs)

    def plot(self, path: str | Path | None = None, **kwargs: Any) -> Figure:
        """Heatmaps of each trained pair beside its control pair (see `StudyResults.plot`)."""
        return self.results.plot(path, **kwargs)


def _checked_layers(name: str, model: nn.Module, layers: Any) -> list[str]:
    """A network's layer list as given, refused if it is not a non-empty list of distinct, existing layer names."""
    checked = check_names(layers, f"layers[{name!r}]", noun="layer", example="['stem', 'layer1.0']")
    for layer in checked:
        parse_address(model, layer)
    return checked


def _first_input(data: Any) -> Any:
    """A batch of inputs like ``data``'s, for probing shapes: its first sample (of a Dataset) or two (of a loader)."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.utils.data.DataLoader):
        x, _ = split_batch(default_collate([data[0]]))  # a sample as a batch of one: tensors and dicts of tensors
        return x
    x, _ = split_batch(next(iter(data)))
    if isinstance(x, dict):
        return {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x[:2] if isinstance(x, torch.Tensor) else x


class _CellProgress:
    """Moves the study's cell bar while a pair trains: its cells advance in step with the optimiser.

    The bar moves by multiples of `QUANTUM`, a power-of-two fraction of a cell, so every partial move and the
    pair's remainder are exact in floating point and a finished pair adds exactly its cell count. Moves of
    ``cells * done / total`` did not add up exactly: the bar ended a little past its total (tqdm's
    "clamping frac to range [0, 1]" warning and an ETA of ``-00:00``) or a little short of it.
    """

    QUANTUM = 1 / 64

    def __init__(self, bar: Any) -> None:
        self.bar, self.moved = bar, 0.0

    def for_cells(self, cells: int) -> Any:
        def on_step(done: int, total: int) -> None:
            share = min(done, total) / total * 0.95  # the last 5% when the pair is evaluated and stored
            target = math.floor(cells * share / self.QUANTUM) * self.QUANTUM
            self.bar.update(target - self.moved)
            self.moved = target

        return on_step


def _merge_config(saved: dict[str, Any] | None, config: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    """The stored record after this run: refuse other settings, else add this run's pairs to the union.

    ``"config"`` keeps the first objective's settings (what `StudyResults.open`
    reads); ``"config:<objective>"`` must match this study exactly.
    """
    if saved is None:
        return config
    if key != "config":
        differences = _differences(saved, config)
        if differences:
            raise StitchError(
                f"{where} holds a different study: {'; '.join(differences)}. Use another output folder for this "
                "one (or delete that folder to start over)"
            )
    pairs = [tuple(p) for p in saved.get("pairs", [])] + [tuple(p) for p in config["pairs"]]
    sanity = {tuple(p) for p in saved.get("sanity_pairs", [])} | {tuple(p) for p in config.get("sanity_pairs", [])}
    full = {tuple(p) for p in saved.get("pairs", [])} - {tuple(p) for p in saved.get("sanity_pairs", [])}
    full |= {tuple(p) for p in config["pairs"]} - {tuple(p) for p in config.get("sanity_pairs", [])}
    return {
        **saved,
        "pairs": [list(p) for p in dict.fromkeys(pairs)],
        "sanity_pairs": [list(p) for p in sorted(sanity - full)],  # a self-pair run in full is no longer diagonal-only
    }


def _differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What differs between two study records, in words (which pairs are run does not count)."""
    saved, config = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(config, default=str))
    out = []
    for key in sorted((set(saved) | set(config)) - {"pairs", "sanity_pairs", "fingerprints"}):
        was, now = saved.get(key), config.get(key)
        if isinstance(was, dict) and isinstance(now, dict):  # name the fields that differ (the recipe's)
            out += [f"{key}.{k} was {was.get(k)}, now {now.get(k)}" for k in {**was, **now} if was.get(k) != now.get(k)]
        elif was != now:
            out.append(f"{key} was {was!r}, now {now!r}")
    old, new = saved.get("fingerprints", {}), config.get("fingerprints", {})
    for name in sorted(set(old.get("networks", {})) | set(new.get("networks", {}))):
        if old.get("networks", {}).get(name) != new.get("networks", {}).get(name):
            out.append(f"network {name!r} has other weights")
    for part in ("train_data", "test_data", "numerics"):
        if old.get(part) != new.get(part):
            out.append(f"{part} differs (was {old.get(part)}, now {new.get(part)})")
    return out
