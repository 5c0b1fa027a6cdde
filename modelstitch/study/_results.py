"""`StudyResults`: a study's store read back as matrices, tidy rows, CSV and heatmaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import StitchError
from ._store import ResultStore, read_run_meta

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ._plot import Panel

__all__ = ["SANITY_TOLERANCE", "UNDERTRAINED", "StudyResults", "slug"]

SANITY_TOLERANCE = 0.02
"""How far (accuracy, absolute) a self-stitch may fall below its network's own accuracy and still pass."""

UNDERTRAINED = ("start", "rising")
"""The ``convergence`` values of a cell that may be under-trained: it kept its start, or was still rising."""


class StudyResults:
    """Read-only view of a study's store: matrices, tidy rows, CSV and figures.

    Open a finished (or half-finished) run folder without the networks with
    `StudyResults.open`.
    """

    def __init__(self, out: str | Path, config: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> None:
        self.out = Path(out)
        self.layers: dict[str, list[str]] = {k: list(v) for k, v in config["layers"].items()}
        self.controls: dict[str, str] = dict(config.get("controls", {}))
        self.objective: str = config.get("objective", "task")
        self.measures: list[str] = list(config.get("measures", ["stitch"]))
        self.sanity_pairs = [tuple(p) for p in config.get("sanity_pairs", [])]
        self.pairs = [tuple(p) for p in pairs]

    @classmethod
    def open(cls, out: str | Path) -> StudyResults:
        """The results in run folder ``out`` (which holds ``study.sqlite``)."""
        config = read_run_meta(out, "config")
        if config is None:
            raise StitchError(f"{out} has no study settings; it was not written by modelstitch")
        return cls(out, config, config.get("pairs", []))

    @property
    def store_path(self) -> Path:
        """The SQLite file."""
        return self.out / "study.sqlite"

    def _check_name(self, name: str, where: str) -> None:
        if name not in self.layers:
            raise StitchError(f"{where} names {name!r}, which is not a network of this study ({sorted(self.layers)})")

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Finished cells as dicts (see `ResultStore.rows`)."""
        with ResultStore(self.store_path) as store:
            return store.rows(**where)

    def matrix(
        self, sender: str, receiver: str, *, value: str = "accuracy", objective: str | None = None
    ) -> np.ndarray:
        """The similarity matrix of one ordered pair.

        Args:
            sender: the sender network's name.
            receiver: the receiver network's name.
            value: a cell column (``"accuracy"``, ``"loss"``, ``"init_accuracy"``...)
                or the name of a similarity measure the study computed (``"cka"``...).
            objective: whose cells (default: the study's objective; measures have none).

        Returns:
            ``[I, J]`` float array: entry ``[i, j]`` is ``value`` of sender layer
            ``i`` stitched into receiver layer ``j``; NaN where not finished.
        """
        self._check_name(sender, "matrix")
        self._check_name(receiver, "matrix")
        out = np.full((len(self.layers[sender]), len(self.layers[receiver])), np.nan)
        if value in self.measures and value != "stitch":
            rows = self.measure_rows(sender=sender, receiver=receiver, measure=value)
            index_a = {name: i for i, name in enumerate(self.layers[sender])}
            index_b = {name: j for j, name in enumerate(self.layers[receiver])}
            for row in rows:
                sl, rl = index_a.get(row["sender_layer"]), index_b.get(row["receiver_layer"])
                if sl is not None and rl is not None:
                    out[sl, rl] = row["value"]
            return out
        for row in self.rows(sender=sender, receiver=receiver, objective=objective or self.objective):
            if row[value] is not None and row["sender_index"] >= 0 and row["receiver_index"] >= 0:
                out[row["sender_index"], row["receiver_index"]] = row[value]
        return out

    def network_accuracy(self) -> dict[str, float]:
        """Each network's own test accuracy, as measured by the study (the self-stitch reference)."""
        saved = read_run_meta(self.out, "network_accuracy") or {}
        return {name: record["accuracy"] for name, record in saved.items()}

    def self_stitch(self, *, tolerance: float = SANITY_TOLERANCE) -> dict[str, dict[str, Any]]:
        """The sanity check of every network whose self-stitch diagonal is in the store.

        A self-stitch (a network into itself at the same layer) has an exact
        solution, the identity, so it should score the network's own accuracy.

        Args:
            tolerance: how far below the network's accuracy a self-stitch may be and pass.

        Returns:
            ``{network: {"accuracy": its own, "cells": {layer: self-stitch accuracy},
            "floor": min over layers of (self-stitch - network accuracy),
            "worst_layer": where that is, "failed": floor < -tolerance}}``.
        """
        own = self.network_accuracy()
        out: dict[str, dict[str, Any]] = {}
        for row in self.rows(objective=self.objective):
            name = row["sender"]
            if name != row["receiver"] or row["sender_layer"] != row["receiver_layer"] or name not in own:
                continue
            entry = out.setdefault(name, {"accuracy": own[name], "cells": {}})
            entry["cells"][row["sender_layer"]] = row["accuracy"]
        for entry in out.values():
            worst = min(entry["cells"], key=entry["cells"].get)
            entry["floor"] = entry["cells"][worst] - entry["accuracy"]
            entry["worst_layer"] = worst
            entry["failed"] = entry["floor"] < -tolerance
        return out

    def measure_rows(self, **where: Any) -> list[dict[str, Any]]:
        """Stored similarity-measure values (see `ResultStore.measures`)."""
        with ResultStore(self.store_path) as store:
            return store.measures(**where)

    def plot_measures(self, path: str | Path | None = None, **kwargs: Any) -> Figure:
        """Stitching beside each similarity measure, one row per trained pair (default ``out/measures``)."""
        control_names = set(self.controls.values())
        panels = []
        shown = [p for p in self.pairs if p[0] not in control_names and p not in self.sanity_pairs]
        values = [("accuracy" if m == "stitch" else m) for m in self.measures]
        for a, b in shown:
            for measure, value in zip(self.measures, values):
                panels.append(self._panel(a, b, f"{a} → {b}: {measure}", value))
        kwargs.setdefault("columns", len(values))
        kwargs.setdefault("label", "stitching accuracy, or the measure's value")
        from ._plot import plot_heatmaps

        return plot_heatmaps(panels, path or self.out / "measures", **kwargs)

    def to_csv(self, path: str | Path | None = None) -> Path:
        """Write the tidy table of finished cells (default ``out/cells.csv``); its columns are `to_pandas`'s."""
        with ResultStore(self.store_path) as store:
            return store.to_csv(path or self.out / "cells.csv")

    def to_pandas(self) -> pd.DataFrame:
        """The finished cells as a pandas DataFrame: one row per cell, the columns of ``cells.csv``.

        The columns are the cell's key (``sender``, ``sender_layer``,
        ``receiver``, ``receiver_layer``, ``objective``), its layer indices,
        every stored score (``accuracy``, ``loss``, ``holdout_accuracy``,
        ``convergence``, the scores of ``scores="all"``...), its bookkeeping
        (``seconds``, ``seed``, ``recipe``, ``weights``...) and one column per
        similarity measure the study computed (``cka``...), in the order of
        `ResultStore.table`. Values missing from the store are NaN or None.

        Returns:
            A ``pandas.DataFrame`` with one row per finished cell (every objective).

        Raises:
            StitchError: pandas is not installed (``pip install "modelstitch[tables]"``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise StitchError(
                'StudyResults.to_pandas needs pandas, which is not installed: pip install "modelstitch[tables]" '
                "(or write the same table with to_csv())"
            ) from None
        with ResultStore(self.store_path) as store:
            header, rows = store.table()
        return pd.DataFrame(rows, columns=header)

    def plot(
        self,
        path: str | Path | None = None,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        value: str = "accuracy",
        **kwargs: Any,
    ) -> Figure:
        """Heatmaps: each trained pair beside its random-control pair (the paper's Figure 2).

        Args:
            path: file stem; ``.png`` and ``.svg`` are written (default ``out/heatmaps``).
            pairs: the trained pairs to show (default: every pair that is not a control pair).
            value: what the cells show: a stored score (``"accuracy"``,
                ``"loss_recovered_mean"``...) or a measure, as for `matrix`.
            **kwargs: passed to `plot_heatmaps`.

        A red outline marks a self-stitch that failed its sanity check; a
        dashed orange one a cell that may be under-trained (its
        ``convergence`` is ``"start"`` or ``"rising"``, see `TrainResult`).

        Returns:
            The matplotlib ``Figure``.
        """
        control_names = set(self.controls.values())
        shown = pairs or [p for p in self.pairs if p[0] not in control_names and p not in self.sanity_pairs]
        panels = []
        for a, b in shown:
            panels.append(self._panel(a, b, f"{a} → {b}", value))
            if a in self.controls and b in self.controls:
                panels.append(self._panel(self.controls[a], self.controls[b], f"{a} → {b} (random)", value))
        kwargs.setdefault("columns", 2 if any(a in self.controls for a, _ in shown) else None)
        if value != "accuracy":
            kwargs.setdefault("label", value.replace("_", " "))
        from ._plot import plot_heatmaps  # matplotlib loads only when a figure is drawn

        return plot_heatmaps(panels, path or self.out / "heatmaps", **kwargs)

    def plot_grid(self, path: str | Path | None = None, **kwargs: Any) -> Figure:
        """All pairs of the study in one grid of small heatmaps (rows: senders, columns: receivers)."""
        names = list(dict.fromkeys(n for pair in self.pairs for n in pair))
        matrices = {(a, b): self.matrix(a, b) for a, b in self.pairs}
        from ._plot import plot_pair_grid

        return plot_pair_grid(matrices, names, path or self.out / "grid", **kwargs)

    def _panel(self, a: str, b: str, title: str, value: str = "accuracy") -> Panel:
        from ._plot import Panel

        marks = []
        if a == b and value == "accuracy":  # outline the self-stitches that failed their sanity check
            failed = self.self_stitch().get(a, {"cells": {}, "accuracy": 0.0})
            marks = [
                (i, i)
                for i, layer in enumerate(self.layers[a])
                if failed["cells"].get(layer, 1.0) < failed["accuracy"] - SANITY_TOLERANCE
            ]
        flags = []  # cells that may be under-trained: a stitching score only, not a similarity measure
        if value not in self.measures or value == "stitch":
            rows = self.rows(sender=a, receiver=b, objective=self.objective)
            flags = [
                (row["sender_index"], row["receiver_index"])
                for row in rows
                if row["convergence"] in UNDERTRAINED and row["sender_index"] >= 0 and row["receiver_index"] >= 0
            ]
        return Panel(
            marks=marks,
            flags=flags,
            title=title,
            matrix=self.matrix(a, b, value=value),
            sender_labels=[f"{i} {n}" for i, n in enumerate(self.layers[a])],
            receiver_labels=[f"{j} {n}" for j, n in enumerate(self.layers[b])],
            sender_name=f"sender {a}",
            receiver_name=f"receiver {b}",
        )


def slug(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
