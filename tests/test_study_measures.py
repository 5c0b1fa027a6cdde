"""Similarity measures beside stitching: in a Study, in its CSV and figures, in analyze, and in `compare`."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import modelstitch as ms
from modelstitch import analysis, cli, data, zoo
from modelstitch.metrics import compare_layers

LAYERS = ["stem", "layer2.0", "layer4.0"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> ms.Study:
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4)
    recipe = ms.study.PRESETS["quick"].zoo_recipe.replace(epochs=2)
    zoo.train_classifier(net, data.subset(data.digits(), 512), recipe=recipe, device="cpu", progress=False)
    net.eval()
    nets = {"A": net, "A random": zoo.random_control("R1111", seed=1, width=4)}
    return ms.Study(
        nets,
        train_data=data.subset(data.digits(), 64),
        test_data=data.subset(data.digits(train=False), 64),
        out=tmp_path_factory.mktemp("measures"),
        layers=dict.fromkeys(nets, LAYERS),
        controls={"A": "A random"},
        recipe=ms.Recipe(batch_size=32, epochs=1),
        device="cpu",
        measures=("stitch", "cka", "pwcca"),
    ).run(progress=False)


def test_every_cell_gets_every_measure_in_the_store_and_the_csv(study):
    cka = study.matrix("A", "A", value="cka")
    assert cka.shape == (3, 3) and np.isfinite(cka).all()
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)  # a layer against itself
    assert np.isfinite(study.matrix("A random", "A random", value="pwcca")).all()
    with open(study.to_csv()) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 and {"cka", "pwcca", "accuracy"} <= set(rows[0])
    assert all(row["cka"] and row["pwcca"] for row in rows)


def test_measures_match_compare_layers_directly(study):
    direct = compare_layers(
        study.models["A"], LAYERS, study.models["A"], LAYERS, study.test_data, measures=("cka",), device="cpu"
    )["cka"]
    np.testing.assert_allclose(study.matrix("A", "A", value="cka"), direct, rtol=1e-9)


def test_figure_and_rank_correlation(study):
    study.plot_measures()
    assert (study.out / "measures.png").stat().st_size > 0
    correlations = {(c["measure"], c["pairs"]): c for c in analysis.measure_correlations(study)}
    assert set(correlations) == {(m, k) for m in ("cka", "pwcca") for k in ("trained", "control")}
    assert all(c["cells"] == 9 for c in correlations.values())
    assert -1 <= correlations["cka", "trained"]["spearman"] <= 1


def test_rerun_with_other_measures_is_a_different_study(study):
    other = ms.Study(
        study.models,
        train_data=study.train_data,
        test_data=study.test_data,
        out=study.out,
        layers=study.layers,
        controls=study.controls,
        recipe=study.recipe,
        device="cpu",
        measures=("stitch", "cka"),
    )
    with pytest.raises(ms.StitchError, match=r"measures was \['stitch', 'cka', 'pwcca'\], now \['stitch', 'cka'\]"):
        other.run(progress=False)


def test_unknown_measure_is_refused():
    with pytest.raises(ms.StitchError, match=r"measures=.*choose from"):
        ms.Study({"A": zoo.small_resnet("R1111", width=4)}, train_data=[], test_data=[], out="x", measures=("ckaa",))


def test_compare_command_writes_matrices_and_a_figure(tmp_path, capsys):
    code = cli.main(
        ["compare", "R1111", "R1111", "--measures", "cka,procrustes", "--limit", "48", "--out", str(tmp_path),
         "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5 * 5
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "cka: 5 x 5 layers" in capsys.readouterr().out
