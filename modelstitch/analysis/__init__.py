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
  study's SQLite store (resumable); from a run folder alone (`StudyResults`),
  what its store allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import StitchError
from ..core import write_text
from ..study import Study, StudyResults
from ..study._results import slug
from ..train import Recipe, task_of
from ._correlation import measure_correlations
from ._distances import (
    METRICS,
    DistanceStats,
    distance_tables,
    per_sample_mse,
    representation_distances,
    tables_markdown,
)
from ._images import generate_images
from ._triangle import triangle_markdown, triangle_summary

__all__ = [
    "METRICS",
    "DistanceStats",
    "analyze",
    "distance_tables",
    "generate_images",
    "measure_correlations",
    "per_sample_mse",
    "representation_distances",
    "tables_markdown",
    "triangle_markdown",
    "triangle_summary",
]


def analyze(
    study: Study | StudyResults,
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
    6. When the study computed similarity measures, Spearman's rank
       correlation of each with stitching accuracy (`measure_correlations`).

    A study over language models (a causal LM receiver, as ``lm-quick``)
    gets 5 and 6, with the triangle of loss recovered (mean ablation,
    ``triangle.md``) beside that of next-token accuracy
    (``triangle-accuracy.md``); 1-4 are skipped, and ``"skipped"`` says why.

    Given a `StudyResults` (a run folder read back without its networks and
    data, e.g. ``StudyResults.open("runs/mine")``), only what the store
    holds is analysed: 5, 6 and the heatmaps of the stored cells
    (``analysis/heatmaps.png``, and ``analysis/measures.png`` with
    measures); 1-4 need the networks and the data and are skipped, and
    ``"skipped"`` says so. When every cell stores loss recovered
    (``scores="all"``, the default for language models), the triangle is of
    loss recovered beside that of accuracy, as for language models.

    Statistics (5, 6) are over the pairs the study was asked for: the
    self-stitch diagonals that ``Study(sanity=True)`` added are left out,
    counted in their ``excluded_sanity_cells``, and reported on their own as
    the self-stitch floor.

    Args:
        study: a `Study` with ``objective="task"``, or the `StudyResults` of a run folder.
        mse_recipe: recipe of the MSE-trained stitches (the paper trained them
            for 30 epochs against 4); default: the study's.
        images: ``(sender, receiver)`` pairs for image generation.
        progress: show progress.

    Returns:
        ``{"tables": ..., "triangle": ..., "images": {...}, "correlations": [...], "files": [...],
        "skipped": [what was not done, and why]}``; for language models also
        ``"triangle_accuracy"``, and ``"triangle"`` is of loss recovered.

    Raises:
        StitchError: ``study`` is a `Study` of another objective than ``"task"``;
            or a `StudyResults` with ``mse_recipe`` or ``images``, which need the networks.
    """
    if isinstance(study, StudyResults):
        return _analyze_stored(study, mse_recipe=mse_recipe, images=images)
    if study.objective != "task":
        raise StitchError("analyze() takes the task-objective study; it trains the MSE-objective cells itself")
    study.run(progress=progress)
    out = study.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    if any(task_of(study.models[b]).causal for _, b in study.pairs):
        return _analyze_language_models(study, out)
    mse = study.sibling(objective="mse", recipe=mse_recipe or study.recipe)
    mse.run(progress=progress)
    rows = representation_distances(study, mse, study.test_data, progress=progress)
    tables = distance_tables(rows)
    files = [write_text(out / "mse_tables.md", tables_markdown(tables)), _write_csv(out / "mse_cells.csv", rows)]
    from ..study._plot import Panel, plot_heatmaps  # matplotlib loads only here

    control_names = set(study.controls.values())
    trained_pairs = [p for p in study.pairs if p[0] not in control_names and p not in study.sanity_pairs]
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
        path = out / f"images_{slug(a)}__{slug(b)}.png"
        generated[f"{a} -> {b}"] = accuracies = generate_images(study, a, b, path=path, progress=progress)
        table = [{"sender_layer": layer, "accuracy": acc} for layer, acc in accuracies.items()]
        files += [path, _write_csv(path.with_suffix(".csv"), table)]
    triangle, correlations = _triangle_and_correlations(study, out, files)
    return {
        "tables": tables,
        "triangle": triangle,
        "images": generated,
        "correlations": correlations,
        "files": files,
        "skipped": [],
    }


def _analyze_stored(
    results: StudyResults, *, mse_recipe: Recipe | None, images: Sequence[tuple[str, str]] | None
) -> dict[str, Any]:
    """`analyze` from a run folder's store alone: triangles, correlations and heatmaps of the stored cells."""
    asked = [what for what, given in (("mse_recipe", mse_recipe is not None), ("images", bool(images))) if given]
    if asked:
        raise StitchError(
            f"analyze: {asked[0]} needs the study's networks and data, which StudyResults ({results.out}) does not "
            "hold; pass the Study itself (set up in Python, or study_from_file for a TOML study), or drop it"
        )
    rows = results.rows(objective=results.objective)
    if not rows and not results.measure_rows():
        raise StitchError(f"{results.out} holds no finished cells yet; run the study first")
    out = results.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    need = (
        "needs the study's networks and data, which its run folder alone does not hold; pass the Study instead "
        "(analysis.analyze(study) in Python, or modelstitch study analyze --config FILE for a TOML study)"
    )
    skipped = [
        f"MSE-trained cells, distance tables (Tables 1-2) and similarity-trained matrices (Figure 5): training {need}",
        "images (Figure 6): generating them needs the networks and data too",
    ]
    if rows and all(r["loss_recovered_mean"] is not None for r in rows):
        result = _analyze_language_models(results, out)
        result["skipped"] = skipped
    else:
        files: list[Path] = []
        triangle, correlations = _triangle_and_correlations(results, out, files)
        result = {
            "tables": None,
            "triangle": triangle,
            "images": {},
            "correlations": correlations,
            "files": files,
            "skipped": skipped,
        }
    if rows:
        results.plot(out / "heatmaps")
        result["files"] += [out / "heatmaps.png", out / "heatmaps.svg"]
    if len(results.measures) > 1:
        results.plot_measures(out / "measures")
        result["files"] += [out / "measures.png", out / "measures.svg"]
    return result


def _analyze_language_models(study: Study | StudyResults, out: Path) -> dict[str, Any]:
    """`analyze` for a study whose receivers are language models: the triangles and the correlations."""
    triangle = triangle_summary(study, value="loss_recovered_mean")
    by_accuracy = triangle_summary(study)
    files = [
        _write_csv(out / "triangle.csv", triangle["pairs"]),
        write_text(out / "triangle.md", triangle_markdown(triangle, value="loss recovered (mean ablation)")),
        write_text(out / "triangle-accuracy.md", triangle_markdown(by_accuracy, value="next-token accuracy")),
    ]
    correlations = measure_correlations(study, value="loss_recovered_mean") if len(study.measures) > 1 else []
    if correlations:
        files.append(_write_csv(out / "measure_correlations.csv", correlations))
    skipped = [
        "MSE-trained cells, distance tables (Tables 1-2) and similarity-trained matrices (Figure 5): not yet "
        "implemented for language models",
        "images (Figure 6): a language model's input is token ids, not pixels",
    ]
    return {
        "tables": None,
        "triangle": triangle,
        "triangle_accuracy": by_accuracy,
        "images": {},
        "correlations": correlations,
        "files": files,
        "skipped": skipped,
    }


def _triangle_and_correlations(
    study: Study | StudyResults, out: Path, files: list[Path]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The accuracy triangle (``triangle.csv``, ``triangle.md``) and, with measures, their correlations with
    stitching (``measure_correlations.csv``), written to ``out``; the files are appended to ``files``."""
    triangle = triangle_summary(study)
    files.append(_write_csv(out / "triangle.csv", triangle["pairs"]))
    files.append(write_text(out / "triangle.md", triangle_markdown(triangle)))
    correlations = measure_correlations(study) if len(study.measures) > 1 else []
    if correlations:
        files.append(_write_csv(out / "measure_correlations.csv", correlations))
    return triangle, correlations


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_text(path, buffer.getvalue())
