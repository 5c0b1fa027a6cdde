"""A fault campaign: kill -9 a study at random moments, rerun it, and compare with an uninterrupted run.

The study (from a TOML file, through the command line) trains its two zoo networks, fills activation caches,
trains stitches and commits pairs, so random kill times land in every phase. After each kill the same command
runs again; at the end every cell must be present exactly once, equal to an uninterrupted run's, and SQLite's
integrity check must pass. CI runs 4 kills; ``MODELSTITCH_FAULT_KILLS=20`` runs the full campaign.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

STUDY = """
seed = 3

[data]
dataset = "digits"
limit = 256

[recipe]
epochs = 2
batch_size = 32
base_batch_size = 32

[zoo_recipe]
epochs = 2
batch_size = 32
base_batch_size = 32

[networks.A]
zoo = "R1111"
width = 4
control = true
layers = ["stem", "layer2.0", "layer4.0"]

[networks.B]
zoo = "R1211"
width = 4
layers = ["stem", "layer2.0", "layer4.0"]
"""

COLUMNS = "sender, sender_layer, receiver, receiver_layer, objective, accuracy, loss, train_loss, seed, selected_epoch"


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "modelstitch.cli", "study", "run", "--config", str(config), "--out", str(out),
            "--quiet", "--threads", "1", *extra]  # fmt: skip


def _cells(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "study.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return sorted(db.execute(f"SELECT {COLUMNS} FROM cells").fetchall())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "study.toml"
    path.write_text(STUDY)
    return path


@pytest.fixture(scope="module")
def uninterrupted(config) -> tuple[list[tuple], float]:
    out = config.parent / "clean"
    start = time.perf_counter()
    subprocess.run(_command(config, out), check=True, capture_output=True, env=_env())
    return _cells(out), time.perf_counter() - start


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(config, uninterrupted):
    expected, seconds = uninterrupted
    out = config.parent / "killed"
    kills = int(os.environ.get("MODELSTITCH_FAULT_KILLS", "4"))
    rng = random.Random(0)
    for _ in range(kills):
        proc = subprocess.Popen(_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        time.sleep(rng.uniform(0.5, seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_command(config, out), check=True, capture_output=True, env=_env())
    got = _cells(out)
    keys = [row[:5] for row in got]
    assert len(keys) == len(set(keys)), "a cell is stored twice"
    assert got == expected
    leftovers = [p.name for p in out.rglob("*.tmp*")]
    assert not leftovers, leftovers  # no temporary file survives a rerun


@pytest.mark.slow
def test_two_processes_on_one_folder_queue_and_finish_once(config, uninterrupted):
    expected, _ = uninterrupted
    out = config.parent / "two"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": _env()}
    procs = [subprocess.Popen(_command(config, out, "--wait"), **pipes) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert _cells(out) == expected
