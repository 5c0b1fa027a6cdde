"""The paper's analyses of a study: triangle statistics, representation distances, images.

- `triangle_summary`: mean stitched accuracy below and above the line
  ``j/J = i/I`` (layer positions normalised by each network's length), per
  pair and overall, for trained pairs and random controls.
- `representation_distances`: per cell, the mean squared error between the
  expected representation ``B<=j(x)`` and the task-trained ("vanilla") stitch's
  output (EV), the MSE-trained stitch's output (ES), and between the two
  stitches (SV); `distance_tables` aggregates them (Tables 1 and 2).
- `generate_images`: stitch every sender layer into the receiver's
  ``"input"`` and save the generated images beside the originals (Figure 6).
- `analyze`: all of it for a study, written to ``out/analysis/`` and to the
  study's SQLite store (resumable).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._batches import as_loader, iterate_batches
from ._errors import StitchError
from ._plot import Panel, plot_heatmaps
from ._recipe import Recipe
from ._stitched import stitch as make_stitched
from ._store import ResultStore
from ._study import Study, StudyResults, _slug
from ._train import evaluate_stitches, train_stitches

__all__ = [
    "DistanceStats",
    "analyze",
    "distance_tables",
    "generate_images",
    "representation_distances",
    "triangle_summary",
]

METRICS = ("EV", "ES", "SV")


# ----------------------------------------------------------------------------- triangle


def _position(index: int, depth: int) -> float:
    return index / depth if depth > 0 else 0.0


def triangle_summary(results: Study | StudyResults, *, objective: str | None = None) -> dict[str, Any]:
    """Mean accuracy on each side of the line ``j/J = i/I``, per pair and overall.

    A cell (sender layer ``i`` of ``I``, receiver layer ``j`` of ``J``, indices
    from 0) is in the *lower* triangle when ``j/J <= i/I``: the receiver layer
    comes no later, proportionally, than the sender layer. Hernandez et al.
    found high accuracy there and low accuracy above it for trained pairs.

    Args:
        results: a `Study` or `StudyResults`.
        objective: whose cells (default: the study's).

    Returns:
        ``{"pairs": [{"sender", "receiver", "control", "lower", "upper", "gap",
        "n_lower", "n_upper"}, ...], "overall": {"trained": {...},
        "control": {...}}}`` where ``gap = lower - upper`` (NaN where a side is empty).
    """
    view = results.results if isinstance(results, Study) else results
    objective = objective or view.objective
    controls = set(view.controls.values())
    per_pair: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in view.rows(objective=objective):
        if row["accuracy"] is None or row["sender_index"] < 0 or row["receiver_index"] < 0:
            continue
        lower = _position(row["receiver_index"], row["receiver_depth"]) <= _position(
            row["sender_index"], row["sender_depth"]
        )
        sides = per_pair.setdefault((row["sender"], row["receiver"]), {"lower": [], "upper": []})
        sides["lower" if lower else "upper"].append(row["accuracy"])
    pairs = []
    pooled: dict[str, dict[str, list[float]]] = {
        "trained": {"lower": [], "upper": []},
        "control": {"lower": [], "upper": []},
    }
    for (a, b), sides in per_pair.items():
        kind = "control" if a in controls or b in controls else "trained"
        pairs.append({"sender": a, "receiver": b, "control": kind == "control", **_sides(sides)})
        for side in ("lower", "upper"):
            pooled[kind][side].extend(sides[side])
    return {"pairs": pairs, "overall": {kind: _sides(sides) for kind, sides in pooled.items()}}


def _sides(sides: dict[str, list[float]]) -> dict[str, float]:
    lower = float(np.mean(sides["lower"])) if sides["lower"] else math.nan
    upper = float(np.mean(sides["upper"])) if sides["upper"] else math.nan
    return {
        "lower": lower,
        "upper": upper,
        "gap": lower - upper,
        "n_lower": len(sides["lower"]),
        "n_upper": len(sides["upper"]),
    }


# ----------------------------------------------------------------------------- distances


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


_DIST_COLUMNS = ("sender", "sender_layer", "receiver", "receiver_layer", "sender_index", "receiver_index", "control")
_STAT_FIELDS = ("n", "total", "total_sq", "minimum", "maximum")


def _ensure_distance_table(store: ResultStore) -> None:
    stat_columns = ", ".join(f"{m}_{f} REAL" for m in METRICS for f in _STAT_FIELDS)
    with store.transaction() as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS distances (sender TEXT, sender_layer TEXT, receiver TEXT, receiver_layer TEXT, "
            f"sender_index INTEGER, receiver_index INTEGER, control INTEGER, {stat_columns}, "
            "PRIMARY KEY (sender, sender_layer, receiver, receiver_layer))"
        )


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
        _ensure_distance_table(store)
        with store.transaction() as db:
            done = {tuple(r) for r in db.execute("SELECT DISTINCT sender, receiver FROM distances")}
    loader = as_loader(data, batch_size=batch_size, shuffle=False)
    for a, b in pairs or task.pairs:
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
                row.update({f"{m}_{f}": getattr(st, f) for f in _STAT_FIELDS})
            rows.append(row)
        columns = [*_DIST_COLUMNS, *(f"{m}_{f}" for m in METRICS for f in _STAT_FIELDS)]
        with ResultStore(task.store_path) as store, store.transaction() as db:
            db.executemany(
                f"INSERT OR REPLACE INTO distances ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [tuple(r[c] for c in columns) for r in rows],
            )
        if progress:
            print(f"distances: {a} -> {b} done")
    return _distance_rows(task.store_path)


def _distance_rows(path: Path) -> list[dict[str, Any]]:
    with ResultStore(path) as store:
        _ensure_distance_table(store)
        with store.transaction() as db:
            cursor = db.execute("SELECT * FROM distances ORDER BY sender, receiver, sender_index, receiver_index")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r)) for r in cursor.fetchall()]


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
                table[m].merge(DistanceStats(**{f: row[f"{m}_{f}"] for f in _STAT_FIELDS}))
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


# ----------------------------------------------------------------------------- images


def generate_images(
    study: Study,
    sender: str,
    receiver: str,
    *,
    path: str | Path | None = None,
    recipe: Recipe | None = None,
    n_images: int = 6,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Stitch every sender layer into the receiver's ``"input"`` and save a grid of images.

    Each stitch is trained with the task objective through the whole receiver,
    so it learns to *generate* an input the receiver classifies correctly. The
    grid has one row per sender layer: generated images beside the originals,
    de-normalised for display.

    Args:
        study: the study whose networks and data to use.
        sender: the sender network's name.
        receiver: the receiver network's name.
        path: the PNG (default ``out/analysis/images_<sender>__<receiver>.png``).
        recipe: training recipe (default: the study's).
        n_images: test images shown per row.
        mean: per-channel mean for de-normalising (default: the dataset's
            ``.mean`` attribute, else no de-normalisation).
        std: per-channel std, likewise.
        progress: show progress bars.

    Returns:
        ``{sender_layer: accuracy of the image-generating stitched network}``.
    """
    from .data import denormalize

    sender_model, receiver_model = study.models[sender], study.models[receiver]
    example = study.example_input
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(study.seed)
        stitched = [
            make_stitched(sender_model, layer, receiver_model, "input", example_input=example)
            for layer in study.layers[sender]
        ]
    train_stitches(
        stitched,
        study.train_data,
        recipe=recipe or study.recipe,
        device=study.device,
        progress=progress,
        cache=study.cache,
    )
    accuracy = evaluate_stitches(stitched, study.test_data, device=study.device)
    loader = as_loader(study.test_data, batch_size=n_images, shuffle=False)
    x, _ = next(iter(iterate_batches(loader, study.device)))
    mean = mean if mean is not None else getattr(study.test_data, "mean", None)
    std = std if std is not None else getattr(study.test_data, "std", None)

    def show(images: torch.Tensor) -> np.ndarray:
        images = images.detach().float().cpu()
        if mean is not None and std is not None:
            images = denormalize(images, mean, std)
        return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    rows = []
    with torch.no_grad():
        for model in stitched:
            rows.append((model.sender_layer, show(model.stitch(model.provided_representation(x))), show(x)))
    path = Path(path) if path else study.out / "analysis" / f"images_{_slug(sender)}__{_slug(receiver)}.png"
    _save_image_grid(rows, path, title=f"{sender} layers -> {receiver} input (generated | original)")
    return {m.sender_layer: r["accuracy"] for m, r in zip(stitched, accuracy)}


def _save_image_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, *, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = rows[0][1].shape[0]
    fig = Figure(figsize=(2 * n * 0.9, len(rows) * 0.95 + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 2 * n, squeeze=False)
    for r, (label, generated, original) in enumerate(rows):
        for k in range(n):
            for col, image in ((2 * k, generated[k]), (2 * k + 1, original[k])):
                ax = axes[r][col]
                ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r][0].set_ylabel(f"{r} {label}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


# ----------------------------------------------------------------------------- everything


def analyze(
    study: Study,
    *,
    mse_recipe: Recipe | None = None,
    images: Sequence[tuple[str, str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the paper's analyses on a (finished) task study; write everything to ``out/analysis/``.

    1. The same cells trained with the MSE objective (resumable, in the same store).
    2. Representation distances (EV, ES, SV) and Tables 1/2 as CSV and Markdown.
    3. The similarity-trained accuracy matrices beside the task-trained ones (Figure 5).
    4. Generated images for ``images`` pairs (default: the first trained pair), and the
       accuracy of each image-generating stitched network (CSV).
    5. The triangle summary (CSV and Markdown).

    Args:
        study: a `Study` with ``objective="task"``.
        mse_recipe: recipe of the MSE-trained stitches (the paper trained them
            for 30 epochs against 4); default: the study's.
        images: ``(sender, receiver)`` pairs for image generation.
        progress: show progress.

    Returns:
        ``{"tables": ..., "triangle": ..., "images": {...}, "files": [...]}``.
    """
    if study.objective != "task":
        raise StitchError("analyze() takes the task-objective study; it trains the MSE-objective cells itself")
    study.run(progress=progress)
    out = study.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    mse = study.sibling(objective="mse", recipe=mse_recipe or study.recipe)
    mse.run(progress=progress)
    rows = representation_distances(study, mse, study.test_data, progress=progress)
    tables = distance_tables(rows)
    files = [_write_text(out / "mse_tables.md", tables_markdown(tables)), _write_csv(out / "mse_cells.csv", rows)]
    control_names = set(study.controls.values())
    trained_pairs = [(a, b) for a, b in study.pairs if a not in control_names]
    panels = []
    for a, b in trained_pairs:
        for objective in ("task", "mse"):
            panels.append(
                Panel(
                    title=f"{a} → {b} ({'task' if objective == 'task' else 'MSE'}-trained)",
                    matrix=study.results.matrix(a, b, objective=objective),
                    sender_labels=[str(i) for i in range(len(study.layers[a]))],
                    receiver_labels=[str(j) for j in range(len(study.layers[b]))],
                    sender_name=f"sender {a}",
                    receiver_name=f"receiver {b}",
                )
            )
    plot_heatmaps(panels, out / "similarity_trained", columns=2)
    files += [out / "similarity_trained.png", out / "similarity_trained.svg"]
    generated = {}
    for a, b in images if images is not None else trained_pairs[:1]:
        path = out / f"images_{_slug(a)}__{_slug(b)}.png"
        generated[f"{a} -> {b}"] = accuracies = generate_images(study, a, b, path=path, progress=progress)
        table = [{"sender_layer": layer, "accuracy": acc} for layer, acc in accuracies.items()]
        files += [path, _write_csv(path.with_suffix(".csv"), table)]
    triangle = triangle_summary(study)
    files.append(_write_csv(out / "triangle.csv", triangle["pairs"]))
    files.append(_write_text(out / "triangle.md", _triangle_markdown(triangle)))
    return {"tables": tables, "triangle": triangle, "images": generated, "files": files}


def _triangle_markdown(summary: dict[str, Any]) -> str:
    lines = ["| pairs | lower (j/J <= i/I) | upper (j/J > i/I) | gap |", "|---|---|---|---|"]
    for kind, s in summary["overall"].items():
        lower = f"{s['lower']:.3f} ({s['n_lower']} cells)"
        upper = f"{s['upper']:.3f} ({s['n_upper']} cells)"
        lines.append(f"| {kind} | {lower} | {upper} | {s['gap']:+.3f} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return _write_text(path, buffer.getvalue())
