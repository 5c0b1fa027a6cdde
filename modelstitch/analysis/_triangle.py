"""`triangle_summary`: mean stitching accuracy below and above the line ``j/J = i/I``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..study import Study, StudyResults

__all__ = ["triangle_summary", "triangle_markdown"]


def _position(index: int, depth: int) -> float:
    return index / depth if depth > 0 else 0.0


def triangle_summary(
    results: Study | StudyResults,
    *,
    objective: str | None = None,
    value: str = "accuracy",
    include_sanity: bool = False,
) -> dict[str, Any]:
    """Mean accuracy (or another stored score) on each side of the line ``j/J = i/I``, per pair and overall.

    A cell (sender layer ``i`` of ``I``, receiver layer ``j`` of ``J``, indices
    from 0) is in the *lower* triangle when ``j/J <= i/I``: the receiver layer
    comes no later, proportionally, than the sender layer. Hernandez et al.
    found high accuracy there and low accuracy above it for trained pairs.

    Args:
        results: a `Study` or `StudyResults`.
        objective: whose cells (default: the study's).
        value: the cell column to average (``"loss_recovered_mean"``...);
            the self-stitch floors are of accuracy whatever it is.
        include_sanity: also average the self-stitch diagonals that
            ``Study(sanity=True)`` added on its own (by default they are left
            out: they are no pair the study was asked for, and a diagonal of
            a network into itself lies all on the lower side).

    Returns:
        ``{"pairs": [{"sender", "receiver", "control", "lower", "upper", "gap",
        "n_lower", "n_upper"}, ...], "overall": {"trained": {...},
        "control": {...}}, "self_stitch_floor": {network: min over layers of
        (self-stitch - network accuracy)}, "excluded_sanity_cells": how many
        self-stitch cells the study added were left out}`` where ``gap = lower
        - upper`` (NaN where a side is empty); a floor below -0.02 means a
        self-stitch failed.
    """
    view = results.results if isinstance(results, Study) else results
    objective = objective or view.objective
    controls = set(view.controls.values())
    sanity = set() if include_sanity else set(view.sanity_pairs)  # self-stitch diagonals only: not a grid
    per_pair: dict[tuple[str, str], dict[str, list[float]]] = {}
    excluded = 0
    for row in view.rows(objective=objective):
        if row[value] is None or row["sender_index"] < 0 or row["receiver_index"] < 0:
            continue
        if (row["sender"], row["receiver"]) in sanity:
            excluded += 1
            continue
        lower = _position(row["receiver_index"], row["receiver_depth"]) <= _position(
            row["sender_index"], row["sender_depth"]
        )
        sides = per_pair.setdefault((row["sender"], row["receiver"]), {"lower": [], "upper": []})
        sides["lower" if lower else "upper"].append(row[value])
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
    floors = {name: s["floor"] for name, s in view.self_stitch().items()}
    return {
        "pairs": pairs,
        "overall": {kind: _sides(sides) for kind, sides in pooled.items()},
        "self_stitch_floor": floors,
        "excluded_sanity_cells": excluded,
    }


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


def triangle_markdown(summary: dict[str, Any], *, value: str = "accuracy") -> str:
    """The overall rows of a `triangle_summary` as a Markdown table (``value``: what its means are of)."""
    lines = [f"| pairs (mean {value}) | lower (j/J <= i/I) | upper (j/J > i/I) | gap |", "|---|---|---|---|"]
    for kind, s in summary["overall"].items():
        lower = f"{s['lower']:.3f} ({s['n_lower']} cells)"
        upper = f"{s['upper']:.3f} ({s['n_upper']} cells)"
        lines.append(f"| {kind} | {lower} | {upper} | {s['gap']:+.3f} |")
    excluded = summary.get("excluded_sanity_cells", 0)
    if excluded:
        lines += ["", f"{excluded} self-stitch cells the study added as its sanity check are not in these means."]
    floors = summary.get("self_stitch_floor", {})
    if floors:
        lines += ["", "| network | self-stitch floor (min over layers: self-stitch - own accuracy) |", "|---|---|"]
        lines += [f"| {name} | {floor:+.3f} |" for name, floor in floors.items()]
    return "\n".join(lines) + "\n"
