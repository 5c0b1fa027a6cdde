"""Similarity measures beside stitching: in a Study, in its CSV and figures, in analyze, and in `compare`."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

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


# ---------------------------------------------------------------- the cells a user asked for (issue 22)


@pytest.fixture(scope="module")
def asked(tmp_path_factory) -> ms.Study:
    """A Study made in Python: A -> B and B -> A (18 cells asked for), and the 3 + 3 self-stitch cells it adds."""
    recipe = ms.study.PRESETS["quick"].zoo_recipe.replace(epochs=1)
    nets = {}
    for seed, name in enumerate("AB"):
        torch.manual_seed(seed)
        nets[name] = zoo.small_resnet("R1111", width=4)
        zoo.train_classifier(nets[name], data.subset(data.digits(), 256), recipe=recipe, device="cpu", progress=False)
        nets[name].eval()
    with pytest.warns(ms.StitchWarning, match="optimiser steps"):  # a tiny study, on purpose
        return ms.Study(
            nets,
            train_data=data.subset(data.digits(), 64),
            test_data=data.subset(data.digits(train=False), 64),
            out=tmp_path_factory.mktemp("asked"),
            pairs=[("A", "B"), ("B", "A")],
            layers=dict.fromkeys(nets, LAYERS),
            recipe=ms.Recipe(batch_size=32, epochs=1),
            device="cpu",
            measures=("stitch", "cka"),
        ).run(progress=False)


def test_statistics_leave_out_the_self_stitch_cells_the_study_added(asked):
    from scipy.stats import spearmanr

    assert asked.sanity_pairs == [("A", "A"), ("B", "B")] and len(asked.rows()) == 24
    (trained,) = [c for c in analysis.measure_correlations(asked) if c["pairs"] == "trained"]
    assert (trained["cells"], trained["excluded_sanity_cells"]) == (18, 6)
    pairs = [("A", "B"), ("B", "A")]
    accuracy = np.concatenate([asked.matrix(a, b).ravel() for a, b in pairs])
    cka = np.concatenate([asked.matrix(a, b, value="cka").ravel() for a, b in pairs])
    assert trained["spearman"] == pytest.approx(spearmanr(accuracy, cka).statistic)

    (everything,) = [c for c in analysis.measure_correlations(asked, include_sanity=True) if c["pairs"] == "trained"]
    assert (everything["cells"], everything["excluded_sanity_cells"]) == (24, 0)

    summary = analysis.triangle_summary(asked)
    overall = summary["overall"]["trained"]
    assert (overall["n_lower"] + overall["n_upper"], summary["excluded_sanity_cells"]) == (18, 6)
    assert {(p["sender"], p["receiver"]) for p in summary["pairs"]} == set(pairs)
    with_sanity = analysis.triangle_summary(asked, include_sanity=True)
    overall = with_sanity["overall"]["trained"]
    assert (overall["n_lower"] + overall["n_upper"], with_sanity["excluded_sanity_cells"]) == (24, 0)
    assert "6 self-stitch cells" in analysis.triangle_markdown(summary)


def test_to_pandas_is_the_cells_csv_table(asked):
    header = (asked.out / "cells.csv").read_text().splitlines()[0].split(",")  # written by run()
    frame = asked.to_pandas()
    assert list(frame.columns) == header == [*ms.study.CELL_COLUMNS, "cka"]
    assert len(frame) == len(asked.rows()) == 24
    for a, b in [("A", "B"), ("B", "A"), ("A", "A")]:
        cells = frame[(frame.sender == a) & (frame.receiver == b)]
        for value in ("accuracy", "cka"):
            table = cells.pivot(index="sender_index", columns="receiver_index", values=value)
            expected = asked.matrix(a, b, value=value)
            got = np.full_like(expected, np.nan)
            got[np.ix_(table.index, table.columns)] = table.to_numpy()
            if value == "accuracy":
                np.testing.assert_array_equal(got, expected)  # NaN off the self-stitch diagonal of A -> A
            else:  # a row per cell: of A -> A, whose CKA is stored for every layer pair, the diagonal's
                np.testing.assert_array_equal(got[~np.isnan(got)], expected[~np.isnan(got)])
                assert (~np.isnan(got)).sum() == len(cells)
    reopened = ms.StudyResults.open(asked.out).to_pandas()
    assert reopened.equals(frame)


def test_to_pandas_without_pandas_says_what_to_install(asked):
    script = (
        "import sys; sys.modules['pandas'] = None\n"
        "import modelstitch as ms\n"
        "try:\n"
        f"    ms.StudyResults.open({str(asked.out)!r}).to_pandas()\n"
        "except ms.StitchError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 'pip install "modelstitch[tables]"' in done.stdout, done.stdout + done.stderr


def test_analyze_a_python_study_from_its_folder(asked, capsys):
    assert cli.main(["study", "analyze", str(asked.out), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not made from a preset: analysing its stored cells only" in out
    assert "6 self-stitch cells the study added as its sanity check are left out" in out
    assert re.search(r"cka vs stitching, trained pairs: Spearman [+-]\d\.\d{3} over 18 cells \(6 self-stitch", out)
    assert out.count("skipped: ") == 2 and "needs the study's networks and data" in out
    for name in ("triangle.md", "triangle.csv", "measure_correlations.csv", "heatmaps.png", "measures.png"):
        assert (asked.out / "analysis" / name).stat().st_size > 0, name
    with open(asked.out / "analysis" / "measure_correlations.csv") as f:
        rows = {row["pairs"]: row for row in csv.DictReader(f)}
    assert (rows["trained"]["cells"], rows["trained"]["excluded_sanity_cells"]) == ("18", "6")

    assert cli.main(["study", "analyze", str(asked.out), "--image-pair", "A", "B"]) == 2
    assert "--image-pair needs the study's networks and data" in capsys.readouterr().err
    with pytest.raises(ms.StitchError, match="images needs the study's networks and data"):
        analysis.analyze(ms.StudyResults.open(asked.out), images=[("A", "B")])


def test_compare_takes_all_and_patterns_of_layer_names(tmp_path, capsys):
    listing = [s.name for s in ms.layer_specs(zoo.small_resnet("R1111"), torch.randn(1, 3, 32, 32))]
    code = cli.main(
        ["compare", "R1111", "R1111", "--layers-a", "all", "--layers-b", "layer*.0,stem", "--limit", "48",
         "--out", str(tmp_path), "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(dict.fromkeys(r["layer_a"] for r in rows)) == listing
    # '*' stays within one part of a dotted name: layer2.0.downsample.0 is not one of layer*.0
    assert list(dict.fromkeys(r["layer_b"] for r in rows)) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "stem"]
    capsys.readouterr()
    code = cli.main(["compare", "R1111", "R1111", "--layers-b", "layr*.0", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--layers-b 'layr*.0' matches no layer of R1111; closest:" in err and "layer1.0" in err


def test_compare_help_says_a_bare_name_is_random_weights(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "random (untrained) weights" in " ".join(capsys.readouterr().out.split())
