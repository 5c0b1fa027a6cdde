"""A study from a TOML file, through the command line."""

from __future__ import annotations

import re

import pytest

import modelstitch as ms
from modelstitch import cli
from modelstitch.study import study_from_file

STUDY = """
measures = ["stitch", "cka"]

[data]
dataset = "digits"
limit = 160

[recipe]
epochs = 1
batch_size = 32
base_batch_size = 32

[zoo_recipe]
epochs = 1
batch_size = 64
base_batch_size = 64

[networks.small]
zoo = "R1111"
width = 4
control = true
layers = ["stem", "layer4.0"]

[networks.other]
zoo = "R1211"
width = 4
layers = ["stem", "layer4.0"]
"""


def test_a_toml_study_runs_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(STUDY)
    assert cli.main(["study", "run", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "20 cells" in out  # 4 pairs of 2 x 2 layers, and the control pair
    assert re.search(r"\((\d+ min )?\d+ s, networks and figures included\)", out)  # how long the whole run took
    results = ms.StudyResults.open(tmp_path / "run")
    assert results.matrix("small", "other", value="cka").shape == (2, 2)
    assert results.controls == {"small": "small random"}
    assert (tmp_path / "run" / "networks" / "small" / "zoo" / "R1111.safetensors").is_file()
    assert (tmp_path / "run" / "cells.csv").is_file() and (tmp_path / "run" / "heatmaps.png").is_file()

    # analyze: from the store alone, then with the study file, which rebuilds the networks and data
    assert cli.main(["study", "analyze", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "analysing its stored cells only" in out and out.count("skipped: ") == 2
    assert "cka vs stitching, trained pairs: Spearman" in out and "over 16 cells" in out
    command = ["study", "analyze", str(tmp_path / "run"), "--config", str(path), "--no-images", "--quiet"]
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert "skipped: " not in out and "mse_tables.md" in out
    assert (tmp_path / "run" / "analysis" / "mse_tables.md").stat().st_size > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("outt = 'x'\n[networks.a]\nzoo = 'R1111'", r"unknown key\(s\) \['outt'\]"),
        ("[data]\ndataset = 'digits'", r"add at least one \[networks.NAME\] table"),
        ("[networks.a]\nzooo = 'R1111'", r"\[networks.a\] has unknown key\(s\) \['zooo'\]"),
        ("[networks.a]\ntorchvision = 'resnet1888'", r"torchvision = 'resnet1888' is not a model name"),
        ("[recipe]\nlrr = 1\n[networks.a]\nzoo = 'R1111'", r"a recipe table has a field Recipe does not know"),
        ("[networks.a\nzoo = 'R1111'", r"is not valid TOML"),
    ],
)
def test_a_bad_study_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ms.StitchError, match=message):
        study_from_file(path, out=tmp_path / "run", device="cpu", progress=False)
