"""Heatmaps of stitching similarity matrices, in the style of Hernandez et al.'s Figure 2.

A similarity matrix ``M`` has shape ``[I, J]``: ``M[i, j]`` is the accuracy (0..1) of
stitching sender layer ``i`` into receiver layer ``j``; NaN marks a pair not computed.
Sender layers run down the rows (0 at the top), receiver layers across the columns
(0 at the left), so the paper's lower-left triangle ``j/J <= i/I`` is in the lower left.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, never with
pyplot, so plotting leaves matplotlib's global state (backend, open figures) alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .._errors import StitchError
from ..core import atomic_path

__all__ = ["Panel", "plot_heatmaps", "plot_pair_grid"]

_AUTO_ANNOTATE_CELLS = 144  # annotate grids up to 12x12 when ``annotate=None``
_MAX_TICKS = 24  # label at most this many layers per axis
_NAN_COLOUR = "0.85"  # light grey


@dataclasses.dataclass(frozen=True, eq=False)
class Panel:
    """One heatmap: a similarity matrix with its layer labels.

    Attributes:
        title: Panel title, e.g. ``"R1111 → R1211"``.
        matrix: Accuracies, shape ``[I, J]`` (sender layers x receiver layers), NaN allowed.
        sender_labels: ``I`` labels for the rows, e.g. ``["0 stem", "1 layer1.0", ...]``.
        receiver_labels: ``J`` labels for the columns.
        sender_name: Y-axis label.
        receiver_name: X-axis label.
        marks: ``(i, j)`` cells to outline in red, e.g. self-stitches that
            failed their sanity check.
        flags: ``(i, j)`` cells to outline in dashed orange, e.g. cells that
            may be under-trained (their ``convergence`` is ``"start"`` or ``"rising"``).

    Raises:
        StitchError: If ``matrix`` is not 2-D and non-empty, or a label list has the wrong length.
    """

    title: str
    matrix: np.ndarray
    sender_labels: Sequence[str]
    receiver_labels: Sequence[str]
    sender_name: str = "sender"
    receiver_name: str = "receiver"
    marks: Sequence[tuple[int, int]] = ()
    flags: Sequence[tuple[int, int]] = ()

    def __post_init__(self) -> None:
        matrix = _as_matrix(self.matrix, f"panel {self.title!r}")
        senders, receivers = tuple(map(str, self.sender_labels)), tuple(map(str, self.receiver_labels))
        if (len(senders), len(receivers)) != matrix.shape:
            raise StitchError(
                f"panel {self.title!r}: matrix has shape {matrix.shape} but got {len(senders)} sender labels "
                f"and {len(receivers)} receiver labels; expected {matrix.shape[0]} and {matrix.shape[1]}"
            )
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "sender_labels", senders)
        object.__setattr__(self, "receiver_labels", receivers)


def plot_heatmaps(
    panels: Sequence[Panel],
    path: str | Path | None = None,
    *,
    columns: int | None = None,
    annotate: bool | None = None,
    diagonal: bool = False,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str | Colormap = "viridis",
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
    suptitle: str | None = None,
    label: str = "stitching accuracy",
) -> Figure:
    """Draw similarity matrices side by side with one shared colorbar.

    Args:
        panels: The heatmaps, e.g. a trained pair and its random-weight control.
        path: If given, save to ``path.with_suffix("." + fmt)`` for each of ``formats``.
        columns: Panels per row; default all in one row for up to 4 panels, else ``ceil(sqrt(n))``.
        annotate: Write each value in its cell; ``None`` does so for grids of at most 144 cells.
        diagonal: Overlay the line ``j/J = i/I`` (top-left corner to bottom-right corner).
        vmin: Accuracy at the bottom of the colour scale.
        vmax: Accuracy at the top of the colour scale.
        cmap: A colormap or its name.
        formats: File formats to write when ``path`` is given.
        dpi: Resolution of raster formats.
        suptitle: Title above all panels.
        label: The colour bar's label.

    Returns:
        The figure (already saved when ``path`` was given).

    Raises:
        StitchError: If there are no panels or ``columns`` is not positive.
    """
    panels = list(panels)
    if not panels:
        raise StitchError("plot_heatmaps needs at least one panel")
    n = len(panels)
    if columns is None:
        columns = n if n <= 4 else math.ceil(math.sqrt(n))
    if columns < 1:
        raise StitchError(f"columns must be positive, got {columns}")
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    cells = max(max(p.matrix.shape) for p in panels)
    side = float(np.clip(0.45 * cells, 2.5, 6.0))  # inches per panel
    fig = _new_figure((columns * (side + 1.3) + 1.2, rows * (side + 1.1) + (0.4 if suptitle else 0.0)))
    norm, colours = Normalize(vmin, vmax), _colormap(cmap)
    axes = []
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        _draw(ax, panel.matrix, norm, colours, diagonal, panel.marks, panel.flags)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.receiver_name)
        ax.set_ylabel(panel.sender_name)
        _ticks(ax, panel.sender_labels, panel.receiver_labels)
        if annotate or (annotate is None and panel.matrix.size <= _AUTO_ANNOTATE_CELLS):
            _annotate(ax, panel.matrix, norm, colours, fontsize=min(8.0, 0.4 * 72 * side / cells))
        axes.append(ax)
    _finish(fig, axes, ScalarMappable(norm, colours), suptitle, label)
    if path is not None:
        _save(fig, Path(path), formats, dpi)
    return fig


def plot_pair_grid(
    matrices: Mapping[tuple[str, str], np.ndarray],
    names: Sequence[str],
    path: str | Path | None = None,
    *,
    diagonal: bool = False,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str | Colormap = "viridis",
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
    suptitle: str | None = None,
) -> Figure:
    """Draw the whole study: one small heatmap per ordered (sender, receiver) pair of networks.

    Row ``r`` holds sender ``names[r]``, column ``c`` receiver ``names[c]``; pairs missing from
    ``matrices`` are left blank. Cells carry no values or tick labels; network names label the
    outer axes.

    Args:
        matrices: ``{(sender, receiver): M}`` with each ``M`` of shape ``[I, J]``, NaN allowed.
        names: Network names, in the order of the rows and columns.
        path: If given, save to ``path.with_suffix("." + fmt)`` for each of ``formats``.
        diagonal, vmin, vmax, cmap, formats, dpi, suptitle: As for `plot_heatmaps`.

    Returns:
        The figure (already saved when ``path`` was given).

    Raises:
        StitchError: If ``names`` is empty or repeats a name, a key names a network not in
            ``names``, or a matrix is not 2-D and non-empty.
    """
    names = [str(name) for name in names]
    if not names or len(set(names)) != len(names):
        raise StitchError(f"names must be non-empty and distinct, got {names}")
    unknown = [key for key in matrices if any(name not in names for name in key)]
    if unknown:
        raise StitchError(f"pairs {unknown} name networks not in names={names}")
    checked = {key: _as_matrix(m, f"pair {tuple(key)!r}") for key, m in matrices.items()}
    n = len(names)
    side = 1.6 if n > 3 else 2.2
    fig = _new_figure((n * side + 1.8, n * side + 1.0 + (0.4 if suptitle else 0.0)))
    norm, colours = Normalize(vmin, vmax), _colormap(cmap)
    axes = []
    for r, sender in enumerate(names):
        for c, receiver in enumerate(names):
            ax = fig.add_subplot(n, n, r * n + c + 1, xticks=[], yticks=[])
            if (sender, receiver) in checked:
                _draw(ax, checked[sender, receiver], norm, colours, diagonal)
            else:  # blank, but the same size as its row's and column's heatmaps so the grid lines up
                rows = next((m.shape[0] for (s, _), m in checked.items() if s == sender), 1)
                cols = next((m.shape[1] for (_, t), m in checked.items() if t == receiver), 1)
                ax.set(xlim=(-0.5, cols - 0.5), ylim=(rows - 0.5, -0.5), aspect="equal", frame_on=False)
            if r == 0:
                ax.set_title(receiver, fontsize="small")
            if c == 0:
                ax.set_ylabel(sender, fontsize="small")
            axes.append(ax)
    fig.supylabel("sender network (rows: sender layer, 0 at top)")
    fig.supxlabel("receiver network (columns: receiver layer, 0 at left)")
    _finish(fig, axes, ScalarMappable(norm, colours), suptitle)
    if path is not None:
        _save(fig, Path(path), formats, dpi)
    return fig


def _as_matrix(matrix: object, what: str) -> np.ndarray:
    """``matrix`` as a float array of shape ``[I, J]`` with ``I, J >= 1``."""
    array = np.array(matrix, dtype=float)  # a copy: later edits by the caller do not change the panel
    if array.ndim != 2 or array.size == 0:
        raise StitchError(f"{what}: the matrix must be 2-D [sender layers, receiver layers], got shape {array.shape}")
    return array


def _colormap(cmap: str | Colormap) -> Colormap:
    """The colormap with NaN cells drawn light grey."""
    base = colormaps[cmap] if isinstance(cmap, str) else cmap
    return base.with_extremes(bad=_NAN_COLOUR)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas, unknown to pyplot."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw(
    ax: Axes,
    matrix: np.ndarray,
    norm: Normalize,
    cmap: Colormap,
    diagonal: bool,
    marks: Sequence[tuple[int, int]] = (),
    flags: Sequence[tuple[int, int]] = (),
) -> None:
    """Show ``matrix`` ``[I, J]`` with row 0 at the top; optionally the line ``j/J = i/I`` and outlined cells."""
    rows, cols = matrix.shape
    ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, origin="upper", interpolation="nearest")
    for i, j in flags:
        ax.add_patch(
            Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor="orange", linewidth=1.5, linestyle="--")
        )
    for i, j in marks:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0))
    if diagonal:
        ax.plot([-0.5, cols - 0.5], [-0.5, rows - 0.5], color="tab:red", lw=1.2, ls="--", scalex=False, scaley=False)


def _ticks(ax: Axes, sender_labels: Sequence[str], receiver_labels: Sequence[str]) -> None:
    """Label up to ``_MAX_TICKS`` evenly spaced layers on each axis."""
    for labels, set_ticks, rotation in ((sender_labels, ax.set_yticks, 0), (receiver_labels, ax.set_xticks, 90)):
        where = list(range(0, len(labels), math.ceil(len(labels) / _MAX_TICKS)))
        long = max(len(label) for label in labels) > 3
        set_ticks(where, [labels[i] for i in where], fontsize="small", rotation=rotation if long else 0)


def _annotate(ax: Axes, matrix: np.ndarray, norm: Normalize, cmap: Colormap, fontsize: float) -> None:
    """Write each finite value in its cell, dark on light colours and light on dark ones."""
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isfinite(value):
            continue
        red, green, blue, _ = cmap(norm(value))
        luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
        colour = "black" if luminance > 0.45 else "white"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=fontsize)


def _finish(
    fig: Figure, axes: list[Axes], mappable: ScalarMappable, suptitle: str | None, label: str = "stitching accuracy"
) -> None:
    """Add the colorbar shared by ``axes`` and the figure title."""
    fig.colorbar(mappable, ax=axes, label=label, shrink=0.85)
    if suptitle:
        fig.suptitle(suptitle)


def _save(fig: Figure, path: Path, formats: Sequence[str], dpi: int) -> None:
    """Write ``fig`` to ``path.with_suffix("." + fmt)`` per format, each atomically (temp file + rename)."""
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    supported = fig.canvas.get_supported_filetypes()
    bad = [fmt for fmt in formats if fmt not in supported]
    if bad:
        raise StitchError(f"unsupported figure formats {bad}; choose from {sorted(supported)}")
    for fmt in formats:
        with atomic_path(path.with_suffix("." + fmt)) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
