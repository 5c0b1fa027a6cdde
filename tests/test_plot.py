from __future__ import annotations

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.lines import Line2D

from modelstitch import StitchError
from modelstitch.study._plot import Panel, plot_heatmaps, plot_pair_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def panel(rows: int, cols: int, title: str = "R1111 → R1211", seed: int = 0) -> Panel:
    matrix = np.random.default_rng(seed).uniform(size=(rows, cols))
    return Panel(title, matrix, [f"{i} layer{i}" for i in range(rows)], [str(j) for j in range(cols)])


def heatmap_axes(fig: matplotlib.figure.Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


def assert_figure_files(folder, stem: str) -> None:
    png, svg = folder / f"{stem}.png", folder / f"{stem}.svg"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_size > 1000
    assert "<svg" in svg.read_text()


@pytest.fixture(autouse=True)
def pyplot_untouched():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before == []


def test_trained_and_control_pair_written_as_png_and_svg(tmp_path):
    control = panel(5, 6, "R1111 (random) → R1211 (random)", seed=1)
    fig = plot_heatmaps([panel(5, 6), control], tmp_path / "out" / "pair", suptitle="pair")
    assert_figure_files(tmp_path / "out", "pair")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pair.png", "pair.svg"]  # no temp files
    axes = heatmap_axes(fig)
    assert [ax.get_title() for ax in axes] == ["R1111 → R1211", "R1111 (random) → R1211 (random)"]
    assert len(fig.axes) == 3  # two heatmaps and one shared colorbar
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in axes] == [(1, 2), (1, 2)]
    assert axes[0].get_xlabel() == "receiver" and axes[0].get_ylabel() == "sender"
    assert [t.get_text() for t in axes[0].get_yticklabels()][:2] == ["0 layer0", "1 layer1"]


def test_row_zero_is_at_the_top_and_columns_start_left():
    ax = heatmap_axes(plot_heatmaps([panel(4, 7)]))[0]
    assert ax.yaxis_inverted()
    assert ax.get_ylim() == pytest.approx((3.5, -0.5))
    assert ax.get_xlim() == pytest.approx((-0.5, 6.5))


def test_small_grids_are_annotated_large_ones_are_not():
    small, large = heatmap_axes(plot_heatmaps([panel(12, 12), panel(13, 13)]))
    assert len(small.texts) == 144
    assert {t.get_text() for t in small.texts} >= {f"{v:.2f}" for v in np.ravel(small.images[0].get_array())[:3]}
    assert len(large.texts) == 0
    forced_on = heatmap_axes(plot_heatmaps([panel(13, 13)], annotate=True))[0]
    forced_off = heatmap_axes(plot_heatmaps([panel(3, 3)], annotate=False))[0]
    assert len(forced_on.texts) == 169 and len(forced_off.texts) == 0


def test_nan_cells_are_not_annotated_and_text_contrasts_with_the_cell():
    matrix = np.array([[0.0, np.nan], [1.0, np.nan]])
    ax = heatmap_axes(plot_heatmaps([Panel("p", matrix, ["a", "b"], ["x", "y"])]))[0]
    texts = {(t.get_position(), t.get_text()): t.get_color() for t in ax.texts}
    assert texts == {((0, 0), "0.00"): "white", ((0, 1), "1.00"): "black"}  # dark cell, light (yellow) cell


def test_diagonal_runs_corner_to_corner_only_when_asked():
    assert not heatmap_axes(plot_heatmaps([panel(3, 5)]))[0].lines
    ax = heatmap_axes(plot_heatmaps([panel(3, 5)], diagonal=True))[0]
    (line,) = ax.lines
    assert isinstance(line, Line2D)
    np.testing.assert_allclose(line.get_xydata(), [[-0.5, -0.5], [4.5, 2.5]])
    assert ax.get_ylim() == pytest.approx((2.5, -0.5))  # the line did not widen the view


def test_layout_defaults_and_explicit_columns():
    five = [panel(2, 2, f"p{k}") for k in range(5)]
    assert heatmap_axes(plot_heatmaps(five))[0].get_subplotspec().get_geometry()[:2] == (2, 3)
    assert heatmap_axes(plot_heatmaps(five[:4]))[0].get_subplotspec().get_geometry()[:2] == (1, 4)
    assert heatmap_axes(plot_heatmaps(five, columns=2))[0].get_subplotspec().get_geometry()[:2] == (3, 2)


def test_panel_copies_matrix_and_accepts_integer_labels():
    matrix = np.ones((2, 3))
    p = Panel("t", matrix, range(2), range(3))
    matrix[0, 0] = 0.0
    assert p.matrix[0, 0] == 1.0
    assert p.sender_labels == ("0", "1") and p.receiver_labels == ("0", "1", "2")


@pytest.mark.parametrize(
    ("matrix", "senders", "receivers", "expected"),
    [
        (np.zeros(3), 3, 1, r"'bad'.*\(3,\)"),
        (np.zeros((2, 2, 2)), 2, 2, r"'bad'.*\(2, 2, 2\)"),
        (np.zeros((0, 2)), 0, 2, r"'bad'.*\(0, 2\)"),
        (np.zeros((2, 3)), 3, 2, r"'bad'.*\(2, 3\).*3 sender labels and 2 receiver"),
    ],
)
def test_bad_shapes_raise(matrix, senders, receivers, expected):
    with pytest.raises(StitchError, match=expected):
        Panel("bad", matrix, [str(i) for i in range(senders)], [str(j) for j in range(receivers)])


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(StitchError, match="at least one panel"):
        plot_heatmaps([])
    with pytest.raises(StitchError, match="columns must be positive"):
        plot_heatmaps([panel(2, 2)], columns=0)
    with pytest.raises(StitchError, match="unsupported figure formats"):
        plot_heatmaps([panel(2, 2)], tmp_path / "f", formats=("png", "nope"))
    assert list(tmp_path.iterdir()) == []


def test_saved_files_get_ordinary_permissions_and_one_format_may_be_a_string(tmp_path):
    plot_heatmaps([panel(2, 2)], tmp_path / "only", formats="png")
    (tmp_path / "plain").write_bytes(b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.png", "plain"]
    assert (tmp_path / "only.png").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_failed_save_leaves_no_file_behind(tmp_path, monkeypatch):
    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half a figure")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_heatmaps([panel(2, 2)], tmp_path / "f")
    assert list(tmp_path.iterdir()) == []


def test_pair_grid_places_senders_in_rows_and_leaves_missing_pairs_blank(tmp_path):
    names = ["A", "B", "C"]
    rng = np.random.default_rng(0)
    matrices = {(s, r): rng.uniform(size=(4, 5)) for s in names for r in names if s != r}
    matrices["A", "B"][0, 0] = np.nan
    fig = plot_pair_grid(matrices, names, tmp_path / "grid.pdf", diagonal=True)
    assert_figure_files(tmp_path, "grid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "grid.svg"]
    grid = fig.axes[:9]
    for k, ax in enumerate(grid):
        sender, receiver = names[k // 3], names[k % 3]
        assert len(ax.images) == (sender != receiver)
        assert not ax.texts and not ax.get_xticks().size and not ax.get_yticks().size
    assert [ax.get_title() for ax in grid[:3]] == names
    assert [grid[3 * r].get_ylabel() for r in range(3)] == names
    np.testing.assert_array_equal(grid[1].images[0].get_array().data, matrices["A", "B"])
    assert len(grid[1].lines) == 1 and grid[1].yaxis_inverted()
    blank = grid[0]  # (A, A): no image, but the same extent as its row and column so the grid lines up
    assert blank.get_xlim() == pytest.approx((-0.5, 4.5)) and blank.get_ylim() == pytest.approx((3.5, -0.5))


def test_pair_grid_rejects_unknown_names_and_bad_matrices():
    with pytest.raises(StitchError, match="not in names"):
        plot_pair_grid({("A", "Z"): np.zeros((2, 2))}, ["A", "B"])
    with pytest.raises(StitchError, match=r"\('A', 'B'\).*\(4,\)"):
        plot_pair_grid({("A", "B"): np.zeros(4)}, ["A", "B"])
    with pytest.raises(StitchError, match="distinct"):
        plot_pair_grid({}, ["A", "A"])
