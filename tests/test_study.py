from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from tqdm import TqdmWarning
from tqdm import std as tqdm_std

import modelstitch as ms
from modelstitch import data, zoo

STUDY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, modelstitch as ms
    from modelstitch import data, zoo
    torch.set_num_threads(1)
    nets = {}
    for k, arch in enumerate(["R1111", "R1211"]):
        torch.manual_seed(k)
        nets[arch] = zoo.small_resnet(arch, width=4)
        nets[arch + " random"] = zoo.random_control(arch, seed=100 + k, width=4)
    study = ms.Study(
        nets,
        train_data=data.subset(data.digits(), 96),
        test_data=data.subset(data.digits(train=False), 48),
        out=sys.argv[1],
        controls={"R1111": "R1111 random", "R1211": "R1211 random"},
        recipe=ms.Recipe(batch_size=32, epochs=1),
        device="cpu",
    )
    study.run(progress=False)
    """
)


def run_study(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STUDY_SCRIPT, str(out)], stderr=subprocess.PIPE)


def finished_rows(out: Path) -> int:
    path = out / "study.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


@pytest.mark.slow
def test_killed_study_resumes_to_the_same_results(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = run_study(killed)
    deadline = time.time() + 300
    while finished_rows(killed) == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed; make it bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = finished_rows(killed)
    assert 0 < partial < 8 * 25 + 8 * 6  # some, not all, pairs were written
    for out in (killed, clean):
        proc = run_study(out)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()

    def table(out: Path) -> dict:
        with sqlite3.connect(out / "study.sqlite") as db:
            rows = db.execute(
                "SELECT sender, sender_layer, receiver, receiver_layer, objective, accuracy, loss, train_loss, seed "
                "FROM cells"
            ).fetchall()
        return {r[:5]: r[5:] for r in rows}

    resumed, uninterrupted = table(killed), table(clean)
    # 4 trained pairs + 4 control pairs; R1111 has 5 layers, R1211 has 6
    assert len(resumed) == len(uninterrupted) == 2 * (25 + 30 + 30 + 36)
    assert resumed == uninterrupted


LAYERS = ["stem", "layer2.0", "layer4.0"]  # three of R1111's five layers keep the shared study small


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    torch.manual_seed(0)
    train, test = data.digits(), data.digits(train=False)
    net = zoo.small_resnet("R1111", width=8)
    recipe = zoo.CLASSIFIER_RECIPE.replace(lr=0.05, batch_size=64, base_batch_size=64, epochs=3, channels_last=False)
    zoo.train_classifier(net, train, recipe=recipe, device="cpu", progress=False)
    nets = {"A": net.eval(), "A random": zoo.random_control("R1111", seed=1, width=8)}
    study = ms.Study(
        nets,
        train_data=train,
        test_data=test,
        out=tmp_path_factory.mktemp("study"),
        layers=dict.fromkeys(nets, LAYERS),
        controls={"A": "A random"},
        recipe=ms.Recipe(lr=0.01, batch_size=64, base_batch_size=64, epochs=2),
        device="cpu",
    )
    return study.run(progress=False)


@pytest.mark.slow
def test_self_stitch_diagonal_beats_random_controls(trained_pair):
    trained = np.diag(trained_pair.matrix("A", "A"))
    control = np.diag(trained_pair.matrix("A random", "A random"))
    assert not np.isnan(trained).any() and not np.isnan(control).any()
    assert trained.mean() > control.mean() + 0.3
    assert (trained[1:] > control[1:]).all()


def test_study_outputs_csv_figure_and_reopens(trained_pair):
    csv_path = trained_pair.to_csv()
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("sender,sender_layer,receiver,receiver_layer,objective")
    assert len(lines) == 1 + 2 * len(LAYERS) ** 2
    trained_pair.plot()
    assert (trained_pair.out / "heatmaps.png").stat().st_size > 0
    reopened = ms.StudyResults.open(trained_pair.out)
    np.testing.assert_array_equal(reopened.matrix("A", "A"), trained_pair.matrix("A", "A"))


def test_rerun_of_a_finished_study_trains_nothing(trained_pair):
    start = time.perf_counter()
    trained_pair.run(progress=False)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda pair: {"seed": 123}, r"different study: seed was 0, now 123\. Use another"),
        # every recipe field is recorded, defaults too: a default that changed between versions is named
        (
            lambda pair: {"recipe": pair.recipe.replace(upsampled_lr_factor=1)},
            r"different study: recipe\.upsampled_lr_factor was 0\.6, now 1\. Use another",
        ),
    ],
    ids=["seed", "a recipe default"],
)
def test_study_refuses_a_different_study_in_the_same_folder(trained_pair, change, message):
    settings = {"layers": trained_pair.layers, "controls": trained_pair.controls, "recipe": trained_pair.recipe}
    other = ms.Study(
        trained_pair.models,
        train_data=trained_pair.train_data,
        test_data=trained_pair.test_data,
        out=trained_pair.out,
        device="cpu",
        **{**settings, **change(trained_pair)},
    )
    with pytest.raises(ms.StitchError, match=message):
        other.run(progress=False)


def test_study_input_errors():
    nets = {"A": zoo.small_resnet("R1111", width=4)}
    digits = data.subset(data.digits(), 8)
    with pytest.raises(ms.StitchError, match="not in models"):
        ms.Study(nets, train_data=digits, test_data=digits, out="unused", pairs=[("A", "B")])
    with pytest.raises(ms.StitchError, match="layers="):
        ms.Study(
            {"mlp": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))},
            train_data=digits,
            test_data=digits,
            out="unused",
        )
    with pytest.raises(ms.StitchError, match="holds no study"):
        ms.StudyResults.open("/nonexistent-folder")


def test_cell_seeds_are_stable_and_distinct():
    a = ms.study.Cell("A", "stem", "B", "stem")
    b = ms.study.Cell("A", "stem", "B", "layer1.0")
    assert a.seed(0) == ms.study.Cell("A", "stem", "B", "stem").seed(0)
    assert len({a.seed(0), b.seed(0), a.seed(1)}) == 3


def test_cli_help_for_every_command(capsys):
    from modelstitch.cli import main

    commands = [[], ["layers"], ["zoo", "train"], ["study", "run"], ["study", "plot"], ["study", "analyze"]]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert "usage: modelstitch" in capsys.readouterr().out


def test_cli_reports_errors_without_a_traceback(capsys, tmp_path):
    from modelstitch.cli import main

    assert main(["study", "plot", str(tmp_path)]) == 2
    assert "holds no study results" in capsys.readouterr().err


def test_a_study_can_grow_by_pairs_in_the_same_folder(tmp_path):
    nets = {"A": zoo.small_resnet("R1111", width=4), "B": zoo.small_resnet("R1111", width=4)}
    digits = data.subset(data.digits(), 32)

    def study(pairs):
        return ms.Study(
            nets,
            train_data=digits,
            test_data=digits,
            out=tmp_path,
            pairs=pairs,
            recipe=ms.Recipe(batch_size=32, epochs=1),
            device="cpu",
        )

    first = study([("A", "B")]).run(progress=False)
    before = {(r["sender_layer"], r["receiver_layer"]): r["created"] for r in first.rows(sender="A", receiver="B")}
    assert len(first.rows()) == 25 + 2 * 5  # A -> B, and the self-stitch diagonals of A and B
    grown = study("all").run(progress=False)
    assert len(grown.rows()) == 4 * 25
    after = {(r["sender_layer"], r["receiver_layer"]): r["created"] for r in grown.rows(sender="A", receiver="B")}
    assert after == before  # the first pair was not trained again
    assert set(ms.StudyResults.open(tmp_path).pairs) == {("A", "B"), ("A", "A"), ("B", "A"), ("B", "B")}


def test_the_cell_bar_moves_while_a_pair_trains(tmp_path, capsys):
    nets = {"A": zoo.small_resnet("R1111", width=4), "B": zoo.small_resnet("R1111", width=4)}
    digits = data.subset(data.digits(), 64)
    ms.Study(
        nets,
        train_data=digits,
        test_data=digits,
        out=tmp_path,
        pairs=[("A", "B")],
        layers={"A": ["stem", "layer4.0"], "B": ["stem", "layer4.0"]},
        recipe=ms.Recipe(batch_size=8, epochs=2),
        device="cpu",
        sanity=False,
    ).run(progress=True)
    err = capsys.readouterr().err
    assert re.search(r"cells:\s+\d+%.*\| [0-3]\.\d/4 ", err), err[-500:]  # a fraction of the pair's 4 cells
    assert "4.0/4" in err


class _RecordingBar(tqdm_std.tqdm):
    """A real tqdm bar that keeps its final count and total when it closes."""

    closed: ClassVar[list[tuple[float, float]]] = []

    def close(self) -> None:
        if not self.disable:
            type(self).closed.append((self.n, self.total))
        super().close()


@pytest.mark.parametrize(("batch_size", "epochs"), [(27, 1), (16, 2)])  # 2 steps a pair (the sum overshot), 3-6
def test_the_cell_bar_ends_at_its_total(tmp_path, monkeypatch, batch_size, epochs):
    """The bar's fractional steps add up to exactly its total: no TqdmWarning, no negative ETA (issue 22)."""
    from modelstitch.study import _study

    monkeypatch.setattr(_study, "tqdm", _RecordingBar)
    monkeypatch.setattr(_RecordingBar, "closed", [])
    nets = {"A": zoo.small_resnet("R1111", width=4), "B": zoo.small_resnet("R1111", width=4)}
    digits = data.subset(data.digits(), 64)
    three = ["stem", "layer2.0", "layer4.0"]
    study = ms.Study(
        nets,
        train_data=digits,
        test_data=digits,
        out=tmp_path,
        pairs=[("A", "B")],  # 9 cells, and the self-stitch diagonals of A and B: 3 + 3
        layers={"A": three, "B": three},
        recipe=ms.Recipe(batch_size=batch_size, epochs=epochs, patience=1),
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)  # few optimiser steps: expected on 64 samples
        warnings.simplefilter("error", TqdmWarning)
        study.run(progress=True)
    assert _RecordingBar.closed == [(15, 15)]


def test_the_quick_preset_runs_its_first_pair_and_max_pairs_adds_the_reverse(tmp_path):
    """Like the paper's figure: R1111 -> R1211 and its control, with both self-stitch diagonals; ``max_pairs=2``
    (``--max-pairs 2``) is the preset of version 0.2, each network into the other."""
    from modelstitch.study import build_preset_study

    tiny = {"limit": 48, "epochs": 0.25, "device": "cpu", "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)  # few optimiser steps on 48 samples
        first = build_preset_study("quick", out=tmp_path, **tiny)
        both = build_preset_study("quick", out=tmp_path, max_pairs=2, **tiny)  # the networks are reused
    assert first.pairs == [("R1111", "R1211"), ("R1111 random", "R1211 random"), ("R1111", "R1111"),
                           ("R1211", "R1211")]  # fmt: skip
    assert both.pairs == [("R1111", "R1211"), ("R1111 random", "R1211 random"), ("R1211", "R1111"),
                          ("R1211 random", "R1111 random"), ("R1111", "R1111"), ("R1211", "R1211")]  # fmt: skip
    assert (len(first.cells()), len(both.cells())) == (30 + 30 + 5 + 6, 131)
