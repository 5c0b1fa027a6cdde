"""The Ray executor: same store as the local executor, survives a killed worker."""

from __future__ import annotations

import os
import signal
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

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

NETWORKS = textwrap.dedent(
    """
    import torch
    from modelstitch import zoo
    def networks():
        nets = {}
        for k, arch in enumerate(["R1111", "R1211"]):
            torch.manual_seed(k)
            nets[arch] = zoo.small_resnet(arch, width=4)
        return nets
    """
)


PAIRS = [("R1111", "R1211"), ("R1211", "R1111")]


def networks() -> dict[str, torch.nn.Module]:
    nets = {}
    for k, arch in enumerate(["R1111", "R1211"]):
        torch.manual_seed(k)
        nets[arch] = zoo.small_resnet(arch, width=4)
    return nets


def tiny_study(out: Path, **options) -> ms.Study:
    return ms.Study(
        networks(),
        train_data=data.subset(data.digits(), 64),
        test_data=data.subset(data.digits(train=False), 32),
        out=out,
        recipe=ms.Recipe(batch_size=32, epochs=1),
        pairs=PAIRS,
        device="cpu",
        **options,
    )


def table(out: Path) -> dict:
    with sqlite3.connect(out / "study.sqlite") as db:
        rows = db.execute(
            "SELECT sender, sender_layer, receiver, receiver_layer, accuracy, loss, train_loss FROM cells"
        ).fetchall()
    return {r[:4]: r[4:] for r in rows}


def test_ray_executor_matches_the_local_executor(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks run with one thread each, as asked
    try:
        tiny_study(tmp_path / "local").run(progress=False)
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        study = tiny_study(tmp_path / "ray").run(progress=False, executor="ray")
    finally:
        ray.shutdown()
    assert study.failures() == []
    local, distributed = table(tmp_path / "local"), table(tmp_path / "ray")
    assert len(local) == 30 + 30 + 5 + 6  # the pair, its control pair, and the two self-stitch diagonals
    assert distributed == local
    assert (tmp_path / "ray" / "stitches").is_dir()


SLOW_PAIR_SCRIPT = NETWORKS + textwrap.dedent(
    """
    import sys, time, modelstitch as ms
    from modelstitch import data

    class SlowStudy(ms.Study):
        def _run_pair(self, a, b):
            time.sleep(2)  # long enough for the test to kill the worker mid-task
            return super()._run_pair(a, b)

    study = SlowStudy(networks(), train_data=data.subset(data.digits(), 64),
                      test_data=data.subset(data.digits(train=False), 32), out=sys.argv[1],
                      recipe=ms.Recipe(batch_size=32, epochs=1), device="cpu",
                      pairs=[("R1111", "R1211"), ("R1211", "R1111")])
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    study.run(progress=False, executor="ray", max_retries=3)
    print("failures:", study.failures())
    """
)


def _task_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::_run_pair_task"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if int(p) != os.getpid()]


def test_a_killed_worker_is_retried_and_the_study_completes(tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "slow_study.py"
    script.write_text(SLOW_PAIR_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = None
    deadline = time.time() + 240
    while killed is None and proc.poll() is None and time.time() < deadline:
        pids = _task_pids()
        if pids:
            time.sleep(0.5)  # let the task get going
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.2)
    assert killed is not None, "no Ray task process was seen"
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "failures: []" in stdout.decode()
    cells = table(out)
    assert len(cells) == 30 + 30 + 5 + 6  # every cell present, once (the key is unique)


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ms.StitchError, match=r"modelstitch\[ray\]"):
        tiny_study(tmp_path).run(progress=False, executor="ray")
