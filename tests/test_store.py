"""The store never mixes studies: fingerprints, one process per folder, schema versions, pair commits."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import modelstitch as ms
from modelstitch import data, zoo
from modelstitch.core import atomic_path, folder_lock
from modelstitch.study import ResultStore

LAYERS = ["stem", "layer4.0"]


def _nets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"A": zoo.small_resnet("R1111", width=4).eval(), "B": zoo.small_resnet("R1111", width=4).eval()}


def _study(out: Path, nets: dict | None = None, *, samples: int = 32, **kw) -> ms.Study:
    nets = nets or _nets()
    return ms.Study(
        nets,
        train_data=data.subset(data.digits(), samples),
        test_data=data.subset(data.digits(train=False), 32),
        out=out,
        pairs=[("A", "B")],
        layers=dict.fromkeys(nets, LAYERS),
        recipe=ms.Recipe(batch_size=16, epochs=1),
        device="cpu",
        sanity=False,
        **kw,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> ms.Study:
    return _study(tmp_path_factory.mktemp("run")).run(progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"samples": 64}, r"train_data differs \(was \{'size': 32"),
        ({"seed": 7}, r"seed was 0, now 7"),
        ({"nets": "retrained"}, r"network 'B' has other weights"),
    ],
)
def test_a_folder_refuses_a_study_that_differs_and_says_how(finished, change, message):
    nets = _nets()
    if change.pop("nets", None):
        with torch.no_grad():
            nets["B"].fc.bias.add_(1.0)
    with pytest.raises(ms.StitchError, match=message) as err:
        _study(finished.out, nets, **change).run(progress=False)
    assert "Use another output folder" in str(err.value)


def test_rerunning_the_same_study_is_accepted_and_trains_nothing(finished):
    before = finished.rows()
    again = _study(finished.out).run(progress=False)
    assert again.rows() == before


def test_a_pair_commits_its_weights_file_and_rows_together(finished):
    files = sorted(p.name for p in (finished.out / "stitches").iterdir())
    names = {row["weights"] for row in finished.rows()}
    assert files == sorted(names) and len(files) == 1  # one pair, one file, named by its rows
    orphan = finished.out / "stitches" / "A__B__task.deadbeef0000.safetensors"  # as a kill between writes leaves
    orphan.write_bytes(b"partial")
    _study(finished.out).run(progress=False)
    assert not orphan.exists()
    cells = finished.load_cells("A", "B")
    assert len(cells) == len(LAYERS) ** 2
    with ResultStore(finished.store_path) as store:
        assert store.integrity_check() == "ok"


HOLD = textwrap.dedent(
    """
    import sys, time
    from modelstitch.core import atomic_path, folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_a_second_process_in_the_folder_is_refused_or_waits(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ms.StitchError, match=rf"another process \(pid {holder.pid}\) is running in .*--wait"):
            _study(tmp_path).run(progress=False)
        start = time.perf_counter()
        _study(tmp_path).run(progress=False, wait=True)  # queues behind the holder, then runs
        assert time.perf_counter() - start > 1.0
    finally:
        holder.wait(timeout=60)
    with folder_lock(tmp_path), folder_lock(tmp_path):  # nested use in one process is fine
        pass


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from modelstitch.core import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_text("half of a new file")
        print(tmp.name, flush=True)
        time.sleep(60)  # killed here, between writing and renaming
    """
)


def test_taking_the_lock_removes_files_of_writers_killed_mid_write(tmp_path):
    target = tmp_path / "plots" / "heatmaps.svg"
    target.parent.mkdir()
    target.write_text("the previous file")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    orphan = target.with_name(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    with atomic_path(tmp_path / "live.csv") as live:  # this process's own write, still open
        live.write_text("in progress")
        with folder_lock(tmp_path):
            assert not orphan.exists()  # the dead writer's temporary file is gone
            assert live.exists()  # a running writer's is kept
    assert target.read_text() == "the previous file"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".lock", "heatmaps.svg", "live.csv"]


def test_a_store_from_another_version_is_refused(tmp_path):
    path = tmp_path / "study.sqlite"
    with sqlite3.connect(path) as db:  # modelstitch 0.1's layout: no schema record, no weights column
        db.execute("CREATE TABLE cells (sender TEXT, accuracy REAL)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    with pytest.raises(ms.StitchError, match=r"written by another version of modelstitch \(store schema 1"):
        ResultStore(path)
    garbage = tmp_path / "g" / "study.sqlite"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ms.StitchError, match="is not a readable modelstitch store"):
        ResultStore(garbage)


def test_a_version_2_store_gains_the_score_columns_and_keeps_its_rows(tmp_path):
    from modelstitch.study._store import SCORE_COLUMNS

    path = tmp_path / "study.sqlite"
    v2 = [c for c in ms.study.CELL_COLUMNS if c not in (*SCORE_COLUMNS, "convergence")]
    key = ("A", "stem", "B", "stem", "task")
    with sqlite3.connect(path) as db:  # modelstitch 0.3's layout (schema 2): no score columns
        db.execute(f"CREATE TABLE cells ({', '.join(v2)}, PRIMARY KEY (sender, sender_layer, receiver, receiver_layer, "
                   "objective))")  # fmt: skip
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema', '2')")
        db.execute("INSERT INTO cells (sender, sender_layer, receiver, receiver_layer, objective, accuracy) VALUES "
                   "(?, ?, ?, ?, ?, 0.75)", key)  # fmt: skip
    with ResultStore(path) as store:
        (row,) = store.rows()
        assert row["accuracy"] == 0.75 and all(row[c] is None for c in (*SCORE_COLUMNS, "convergence"))
        assert store.meta("schema") == 3
        store.add([{**dict(zip(("sender", "sender_layer", "receiver", "receiver_layer", "objective"), key)),
                    "accuracy": 0.5, "loss_recovered_mean": 0.9}])  # fmt: skip
        (row,) = store.rows()
        assert (row["accuracy"], row["loss_recovered_mean"]) == (0.5, 0.9)
    with ResultStore(path) as store:  # opened again: already version 3, nothing to add
        assert store.rows()[0]["loss_recovered_mean"] == 0.9


def test_zoo_files_are_reused_only_for_the_same_recipe_and_data(tmp_path):
    from modelstitch.study import PRESETS, zoo_models

    preset, cpu = PRESETS["quick"], torch.device("cpu")
    file = tmp_path / "zoo" / "R1111.safetensors"

    def build(samples: int, epochs: float) -> int:
        train = data.subset(data.digits(), samples)
        zoo_models(preset, out=tmp_path, train_data=train, test_data=None, seed=0, device=cpu, epochs=epochs,
                   progress=False)  # fmt: skip
        return file.stat().st_mtime_ns

    first = build(64, 0.5)
    assert build(64, 0.5) == first  # same recipe and data: the file is reused
    other_data = build(96, 0.5)
    assert other_data != first
    assert zoo.load_model(file).checkpoint_metadata["training"]["data"]["size"] == 96
    assert build(96, 1.0) != other_data  # another recipe (epochs): trained again
