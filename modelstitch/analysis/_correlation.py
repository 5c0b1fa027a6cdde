"""`measure_correlations`: how well each similarity measure ranks cells the way stitching does."""

from __future__ import annotations

import math
from typing import Any

from ..study import Study, StudyResults

__all__ = ["measure_correlations"]


def measure_correlations(
    results: Study | StudyResults, *, value: str = "accuracy", include_sanity: bool = False
) -> list[dict[str, Any]]:
    """Spearman's rank correlation between stitching accuracy (or ``value``) and each similarity measure.

    Computed separately over the cells of trained pairs and of control pairs
    (``scipy.stats.spearmanr``). A measure that agrees with stitching on which
    layer pairs are alike correlates positively (negatively for the
    ``procrustes`` distance).

    By default the cells are those of the pairs the study was asked for: the
    self-stitch diagonals that ``Study(sanity=True)`` added on its own (each
    layer of a network into itself: CKA 1, accuracy near the network's own)
    are left out, and counted in ``excluded_sanity_cells``. They would pull
    the correlation towards +1. A self-pair the study was asked for (e.g. by
    ``pairs="all"``) is a requested pair and counts.

    Args:
        results: a `Study` or `StudyResults` whose measures include more than ``"stitch"``.
        value: the stored score of a cell to correlate (``"loss_recovered_mean"``...).
        include_sanity: also count the self-stitch cells the study added itself.

    Returns:
        One dict per (measure, kind): ``measure``, ``pairs`` (``"trained"`` or
        ``"control"``), ``cells`` (how many the correlation is over),
        ``spearman``, ``p_value`` (NaN with fewer than three cells or a
        constant column) and ``excluded_sanity_cells`` (self-stitch cells the
        study added that were left out; 0 with ``include_sanity=True``).
    """
    from scipy.stats import spearmanr

    view = results.results if isinstance(results, Study) else results
    controls = set(view.controls.values())
    sanity = set() if include_sanity else set(view.sanity_pairs)
    accuracy = {
        (r["sender"], r["sender_layer"], r["receiver"], r["receiver_layer"]): r[value]
        for r in view.rows(objective=view.objective)
    }
    out = []
    for measure in [m for m in view.measures if m != "stitch"]:
        groups: dict[str, tuple[list[float], list[float]]] = {"trained": ([], []), "control": ([], [])}
        excluded = {"trained": 0, "control": 0}
        for row in view.measure_rows(measure=measure):
            key = (row["sender"], row["sender_layer"], row["receiver"], row["receiver_layer"])
            if accuracy.get(key) is None or row["value"] is None:
                continue
            kind = "control" if row["sender"] in controls or row["receiver"] in controls else "trained"
            if (row["sender"], row["receiver"]) in sanity:
                excluded[kind] += 1
                continue
            groups[kind][0].append(accuracy[key])
            groups[kind][1].append(row["value"])
        for kind, (acc, val) in groups.items():
            rho, p = (math.nan, math.nan)
            if len(acc) >= 3 and len(set(acc)) > 1 and len(set(val)) > 1:
                result = spearmanr(acc, val)
                rho, p = float(result.statistic), float(result.pvalue)
            out.append(
                {
                    "measure": measure,
                    "pairs": kind,
                    "cells": len(acc),
                    "spearman": rho,
                    "p_value": p,
                    "excluded_sanity_cells": excluded[kind],
                }
            )
    return out
