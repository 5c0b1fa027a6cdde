"""Representation distances (EV, ES, SV) between expected representations and stitch outputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..core import as_loader, iterate_batches
from ..study import ResultStore, Study
from ..study._store import DISTANCE_METRICS as METRICS
from ..study._store import STAT_FIELDS

__all__ = [
    "METRICS",
    "DistanceStats",
    "distance_tables",
    "per_sample_mse",
    "representation_distances",
    "tables_markdown",
]


@dataclasses.dataclass
class DistanceStats:
    """Running min, max, sum and sum of squares of per-sample MSEs, for one metric.

    Combining two is exact, so statistics over many cells and samples come
    from per-cell records without keeping every value.

    Examples:
        >>> s = DistanceStats()
        >>> s.add(torch.tensor([1.0, 3.0]))
        >>> s.merge(DistanceStats.of(torch.tensor([5.0])))
        >>> s.n, s.minimum, s.mean, s.maximum, round(s.std, 4)
        (3, 1.0, 3.0, 5.0, 1.633)
    """

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf

    @classmethod
    def of(cls, values: torch.Tensor) -> DistanceStats:
        """Statistics of a 1-D tensor of values."""
        stats = cls()
        stats.add(values)
        return stats

    def add(self, values: torch.Tensor) -> None:
        """Add per-sample values ``[B]``."""
        v = values.detach().double().cpu()
        self.n += v.numel()
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        self.minimum = min(self.minimum, float(v.min()))
        self.maximum = max(self.maximum, float(v.max()))

    def merge(self, other: DistanceStats) -> None:
        """Fold ``other`` into these statistics."""
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @property
    def mean(self) -> float:
        """Mean of all values."""
        return self.total / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of all values."""
        if not self.n:
            return math.nan
        return math.sqrt(max(self.total_sq / self.n - self.mean**2, 0.0))


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements of each sample: ``[B, ...]`` x2 -> ``[B]``.

    Examples:
        >>> per_sample_mse(torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [0, 0, 3]]))
        tensor([1., 3.])
    """
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def representation_distances(
    task: Study,
    mse: Study,
    data: Any,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """EV, ES and SV distances of every cell of finished pairs, stored in the study's SQLite file.

    For each cell: EV is the per-sample MSE between the expected
    representation and the task-trained stitch's output, ES the same for the
    MSE-trained stitch, SV between the two stitches' outputs. Pairs already in
    the store are not computed again.

    Args:
        task: the study with ``objective="task"``.
        mse: the same networks and folder with ``objective="mse"``.
        data: inputs to measure on (e.g. the test set).
        pairs: which ordered pairs (default: every pair of ``task``).
        batch_size: batch size when ``data`` is a Dataset.
        progress: print a line per pair.

    Returns:
        One dict per cell: the cell's names and indices, ``control`` and, per
        metric, ``{metric}_n``, ``_total``, ``_total_sq``, ``_minimum``, ``_maximum``.
    """
    controls = set(task.controls.values())
    with ResultStore(task.store_path) as store:
        done = store.distance_pairs()
    loader = as_loader(data, batch_size=batch_size, shuffle=False)
    for a, b in pairs or [p for p in task.pairs if p not in task.sanity_pairs]:  # not the sanity diagonals
        if (a, b) in done:
            continue
        vanilla, similar = task.load_cells(a, b, "task"), mse.load_cells(a, b, "mse")
        stats = {(c.sender_layer, c.receiver_layer): {m: DistanceStats() for m in METRICS} for c in vanilla}
        for x, _ in iterate_batches(loader, task.device):
            provided = {}
            expected = {}
            for cell, model in vanilla.items():
                if cell.sender_layer not in provided:
                    provided[cell.sender_layer] = model.provided_representation(x)
                if cell.receiver_layer not in expected:
                    expected[cell.receiver_layer] = model.expected_representation(x)
            sim_by_layers = {(c.sender_layer, c.receiver_layer): m for c, m in similar.items()}
            for cell, model in vanilla.items():
                key = (cell.sender_layer, cell.receiver_layer)
                v = model.stitch(provided[cell.sender_layer])
                s = sim_by_layers[key].stitch(provided[cell.sender_layer])
                e = expected[cell.receiver_layer]
                stats[key]["EV"].add(per_sample_mse(e, v))
                stats[key]["ES"].add(per_sample_mse(e, s))
                stats[key]["SV"].add(per_sample_mse(s, v))
        rows = []
        for (sl, rl), metric_stats in stats.items():
            row: dict[str, Any] = {
                "sender": a,
                "sender_layer": sl,
                "receiver": b,
                "receiver_layer": rl,
                "sender_index": task.layers[a].index(sl),
                "receiver_index": task.layers[b].index(rl),
                "control": int(a in controls or b in controls),
            }
            for m, st in metric_stats.items():
                row.update({f"{m}_{f}": getattr(st, f) for f in STAT_FIELDS})
            rows.append(row)
        with ResultStore(task.store_path) as store:
            store.add_distances(rows)
        if progress:
            print(f"distances: {a} -> {b} done")
    with ResultStore(task.store_path) as store:
        return store.distance_rows()


def distance_tables(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Tables 1 and 2: min, mean, max and std of EV, ES, SV over samples and cells.

    Args:
        rows: per-cell records from `representation_distances`.

    Returns:
        ``{table: {metric: {"min", "mean", "max", "std", "n"}}}`` for the tables
        ``"diagonal (trained)"``, ``"all (trained)"``, ``"diagonal (control)"``
        and ``"all (control)"``; the diagonal holds the cells whose sender and
        receiver layers have the same index.
    """
    groups: dict[str, dict[str, DistanceStats]] = {}
    for row in rows:
        kind = "control" if row["control"] else "trained"
        names = [f"all ({kind})"] + ([f"diagonal ({kind})"] if row["sender_index"] == row["receiver_index"] else [])
        for name in names:
            table = groups.setdefault(name, {m: DistanceStats() for m in METRICS})
            for m in METRICS:
                table[m].merge(DistanceStats(**{f: row[f"{m}_{f}"] for f in STAT_FIELDS}))
    order = ["diagonal (trained)", "all (trained)", "diagonal (control)", "all (control)"]
    return {
        name: {
            m: {"min": s.minimum, "mean": s.mean, "max": s.maximum, "std": s.std, "n": s.n}
            for m, s in groups[name].items()
        }
        for name in order
        if name in groups
    }


def tables_markdown(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """The distance tables as one Markdown table (rows: tables; columns: statistic x metric)."""
    stats = ("min", "mean", "max", "std")
    header = "| cells | " + " | ".join(f"{s} {m}" for s in stats for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (1 + len(stats) * len(METRICS))]
    for name, table in tables.items():
        lines.append(f"| {name} | " + " | ".join(f"{table[m][s]:.2e}" for s in stats for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
