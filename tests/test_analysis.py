from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import modelstitch as ms
from modelstitch import analysis, data, zoo
from modelstitch.study import ResultStore


def test_per_sample_mse_by_hand():
    a = torch.zeros(3, 2, 2)
    b = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(analysis.per_sample_mse(a, b), torch.tensor([1.0, 1.0, 0.0]))


def test_distance_stats_merge_equals_statistics_of_all_values():
    values = torch.tensor([0.5, 2.0, 4.0, 1.5, 7.0])
    merged = analysis.DistanceStats.of(values[:2])
    merged.merge(analysis.DistanceStats.of(values[2:]))
    assert merged.n == 5 and merged.minimum == 0.5 and merged.maximum == 7.0
    assert merged.mean == pytest.approx(float(values.mean()))
    assert merged.std == pytest.approx(float(values.std(unbiased=False)))


def _row(sender_index: int, receiver_index: int, control: bool, ev: list[float], es: list[float], sv: list[float]):
    row = {"sender_index": sender_index, "receiver_index": receiver_index, "control": int(control)}
    for name, values in (("EV", ev), ("ES", es), ("SV", sv)):
        s = analysis.DistanceStats.of(torch.tensor(values))
        row.update({f"{name}_{f}": getattr(s, f) for f in ("n", "total", "total_sq", "minimum", "maximum")})
    return row


def test_distance_tables_by_hand():
    rows = [
        _row(0, 0, False, ev=[1.0, 3.0], es=[0.0, 0.0], sv=[1.0, 1.0]),  # diagonal
        _row(1, 0, False, ev=[5.0, 7.0], es=[1.0, 1.0], sv=[2.0, 4.0]),  # off-diagonal
        _row(0, 0, True, ev=[10.0, 10.0], es=[2.0, 2.0], sv=[3.0, 3.0]),
    ]
    tables = analysis.distance_tables(rows)
    assert list(tables) == ["diagonal (trained)", "all (trained)", "diagonal (control)", "all (control)"]
    diagonal = tables["diagonal (trained)"]
    assert diagonal["EV"] == {"min": 1.0, "mean": 2.0, "max": 3.0, "std": 1.0, "n": 2}
    everything = tables["all (trained)"]["EV"]
    assert (everything["min"], everything["mean"], everything["max"]) == (1.0, 4.0, 7.0)
    assert everything["std"] == pytest.approx(math.sqrt(5.0))
    assert tables["all (trained)"]["SV"]["mean"] == 2.0
    assert tables["all (control)"]["ES"]["std"] == 0.0
    markdown = analysis.tables_markdown(tables)
    assert "| diagonal (trained) | 1.00e+00 |" in markdown


def _fake_results(tmp_path, cells):
    layers = {
        "short": ["0", "1", "2"],
        "long": ["0", "1", "2", "3", "4", "5", "6"],
        "short r": ["0", "1", "2"],
        "long r": ["0", "1", "2", "3", "4", "5", "6"],
    }
    config = {"layers": layers, "controls": {"short": "short r", "long": "long r"}, "objective": "task", "pairs": []}
    with ResultStore(tmp_path / "study.sqlite") as store:
        store.set_meta("config", config)
        store.add(cells)
    return ms.StudyResults.open(tmp_path)


def test_triangle_assigns_sides_by_normalised_position(tmp_path):
    # sender "short" has I = 2, receiver "long" has J = 6: (i, j) is lower when j/6 <= i/2
    cells = []
    for i in range(3):
        for j in range(7):
            lower = j / 6 <= i / 2
            cells.append(
                {
                    "sender": "short",
                    "sender_layer": str(i),
                    "receiver": "long",
                    "receiver_layer": str(j),
                    "objective": "task",
                    "sender_index": i,
                    "receiver_index": j,
                    "sender_depth": 2,
                    "receiver_depth": 6,
                    "accuracy": 0.9 if lower else 0.2,
                }
            )
            cells.append(
                {
                    "sender": "short r",
                    "sender_layer": str(i),
                    "receiver": "long r",
                    "receiver_layer": str(j),
                    "objective": "task",
                    "sender_index": i,
                    "receiver_index": j,
                    "sender_depth": 2,
                    "receiver_depth": 6,
                    "accuracy": 0.1,
                }
            )
    summary = analysis.triangle_summary(_fake_results(tmp_path, cells))
    trained = summary["overall"]["trained"]
    # lower cells: i=0 -> j=0 (1); i=1 -> j<=3 (4); i=2 -> all 7 => 12 of 21
    assert (trained["n_lower"], trained["n_upper"]) == (12, 9)
    assert trained["lower"] == pytest.approx(0.9) and trained["upper"] == pytest.approx(0.2)
    assert trained["gap"] == pytest.approx(0.7)
    control = summary["overall"]["control"]
    assert control["gap"] == pytest.approx(0.0)
    assert {p["control"] for p in summary["pairs"]} == {True, False}


def test_image_stitch_outputs_the_receivers_input_shape():
    sender, receiver = zoo.small_resnet("R1111", width=4), zoo.small_resnet("R1211", width=4)
    for layer in zoo.layer_names(sender):
        stitched = ms.stitch(sender, layer, receiver, "input", example_input=torch.randn(2, 3, 32, 32))
        generated = stitched.stitch(stitched.provided_representation(torch.randn(5, 3, 32, 32)))
        assert generated.shape == (5, 3, 32, 32)
        assert stitched(torch.randn(5, 3, 32, 32)).shape == (5, 10)


@pytest.mark.slow
def test_analyze_writes_every_output(tmp_path):
    nets = {}
    for k, arch in enumerate(["R1111", "R1211"]):
        torch.manual_seed(k)
        nets[arch] = zoo.small_resnet(arch, width=4)
        nets[arch + " random"] = zoo.random_control(arch, seed=100 + k, width=4)
    study = ms.Study(
        nets,
        train_data=data.subset(data.digits(), 64),
        test_data=data.subset(data.digits(train=False), 32),
        out=tmp_path,
        controls={"R1111": "R1111 random", "R1211": "R1211 random"},
        pairs=[("R1211", "R1111")],
        recipe=ms.Recipe(batch_size=32, epochs=1),
        device="cpu",
    )
    result = analysis.analyze(study, progress=False)
    for path in result["files"]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert set(result["tables"]) == {"diagonal (trained)", "all (trained)", "diagonal (control)", "all (control)"}
    assert result["tables"]["all (trained)"]["EV"]["n"] == 32 * 6 * 5  # samples x cells
    assert set(result["images"]["R1211 -> R1111"]) == set(zoo.layer_names(nets["R1211"]))
    mse_matrix = study.results.matrix("R1211", "R1111", objective="mse")
    assert mse_matrix.shape == (6, 5) and not np.isnan(mse_matrix).any()
    # a rerun computes nothing again and gives the same tables
    again = analysis.analyze(study, progress=False, images=[])
    assert again["tables"] == result["tables"]
