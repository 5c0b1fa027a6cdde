"""`measure_correlations`: how well each similarity measure ranks cells the way stitching does."""

from __future__ import annotations

import math
from typing import Any

from ..study import Study, StudyResults

__all__ = ["measure_correlations"]


def measure_correlations(results: Study | StudyResults, *, value: str = "accuracy") -> list[dict[str, Any]]:
    """Spearman's rank correlation between stitching accuracy (or ``value``) and each similarity measure.

    Computed separately over the cells of trained pairs and of control pairs
    (``scipy.stats.spearmanr``). A measure that agrees with stitching on which
    layer pairs are alike correlates positively (negatively for the
    ``procrustes`` distance).

    Args:
        results: a `Study` or `StudyResults` whose measures include more than ``"stitch"``.
        value: the stored score of a cell to correlate (``"loss_recovered_mean"``...).

    Returns:
        One dict per (measure, kind): ``measure``, ``pairs`` (``"trained"`` or
        ``"control"``), ``cells``, ``spearman`` and ``p_value`` (NaN with fewer
        than three cells or a constant column).
    """
    from scipy.stats import spearmanr

    view = results.results if isinstance(results, Study) else results
    controls = set(view.controls.values())
    accuracy = {
        (r["sender"], r["sender_layer"], r["receiver"], r["receiver_layer"]): r[value]
        for r in view.rows(objective=view.objective)
    }
    out = []
    for measure in [m for m in view.measures if m != "stitch"]:
        groups: dict[str, tuple[list[float], list[float]]] = {"trained": ([], []), "control": ([], [])}
        for row in view.measure_rows(measure=measure):
            key = (row["sender"], row["sender_layer"], row["receiver"], row["receiver_layer"])
            if accuracy.get(key) is None or row["value"] is None:
                continue
            kind = "control" if row["sender"] in controls or row["receiver"] in controls else "trained"
            groups[kind][0].append(accuracy[key])
            groups[kind][1].append(row["value"])
        for kind, (acc, val) in groups.items():
            rho, p = (math.nan, math.nan)
            if len(acc) >= 3 and len(set(acc)) > 1 and len(set(val)) > 1:
                result = spearmanr(acc, val)
                rho, p = float(result.statistic), float(result.pvalue)
            out.append({"measure": measure, "pairs": kind, "cells": len(acc), "spearman": rho, "p_value": p})
    return out
