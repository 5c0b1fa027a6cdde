"""Real write failures and bad recipe fields, as tables: each case names the error it must raise.

The write failures are real, never mocked: a tiny tmpfs that a checkpoint does
not fit on or that is filled to the last byte, the same tmpfs remounted
read-only, a folder made immutable with ``chattr +i``. Each case checks that
the error is a `StitchError` naming the file and the operating system's
reason, that the folder holds exactly what it held before (the old file
intact, no temporary file), and that the same write succeeds once the disk
is healthy again. Mounting needs root (CI runs as root); elsewhere these
tests are skipped.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import modelstitch as ms
from modelstitch import data, zoo
from modelstitch.core import load_checkpoint, save_checkpoint
from modelstitch.study import ResultStore

FULL = r"No space left on device \(free some space or choose another output folder\)"
READ_ONLY = r"Read-only file system \(the folder is read-only or not writable"
IMMUTABLE = r"Operation not permitted \(the folder is read-only or not writable"
INTACT = r"; nothing was half-written: the previous file, if any, is intact"


class Disk:
    """A real tmpfs mounted for one test, with the ways a real disk refuses a write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler: Path | None = None

    def fill(self) -> None:
        """Write a filler file until the disk is full to the last byte."""
        self._filler = self.root / "filler.bin"
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == 28, err  # ENOSPC
        finally:
            os.close(fd)
        small = 512  # fill the last partial page too
        fd = os.open(self._filler, os.O_WRONLY | os.O_APPEND)
        try:
            while small:
                try:
                    os.write(fd, b"\0" * small)
                except OSError:
                    small //= 2
        finally:
            os.close(fd)

    def free(self) -> None:
        """Delete the filler again."""
        if self._filler is not None:
            self._filler.unlink()
            self._filler = None

    def fail(self, how: str, folder: Path, on: bool = True) -> None:
        """Make writes into ``folder`` (on this disk) fail ``how`` (``on``), or heal the disk again.

        Args:
            how: ``"full"``, ``"read-only"``, ``"immutable"``, or ``"too small"`` (nothing to do: the
                file is larger than the disk).
            folder: the folder written to (made immutable).
            on: fail, or heal.
        """
        if how == "full" and on:
            self.fill()
        elif how == "full":
            self.free()
        elif how == "read-only":
            self.read_only(on)
        elif how == "immutable":
            self.immutable(folder, on)

    def read_only(self, on: bool = True) -> None:
        """Remount the tmpfs read-only (``on``) or writable again."""
        _run("mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.root))

    def immutable(self, folder: Path, on: bool = True) -> None:
        """``chattr +i`` (``on``) or ``-i`` on ``folder``; skips the test where chattr is missing or refused."""
        if shutil.which("chattr") is None:
            pytest.skip("chattr is not installed")
        done = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr {'+i' if on else '-i'} refused: {done.stderr.strip()}")


def _run(*command: str) -> None:
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Disk]]:
    """Mount tiny tmpfs file systems for one test (``tmpfs(where, size="256k")``); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(where: Path | None = None, size: str = "256k") -> Disk:
        where = where or tmp_path / f"disk{len(mounted)}"
        where.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
            )
        except OSError as err:  # no mount command
            pytest.skip(f"cannot mount a tmpfs here ({err})")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return Disk(where)

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["chattr", "-R", "-i", str(where)], capture_output=True)
            subprocess.run(["mount", "-o", "remount,rw", str(where)], capture_output=True)
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)  # a file still open


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resnet(width: int) -> zoo.SmallResNet:
    torch.manual_seed(0)
    return zoo.small_resnet("R1111", width=width)


def _save_model(width: int) -> Callable[[Path], Path]:
    return lambda folder: zoo.save_model(folder / "R1111.safetensors", _resnet(width), dataset="digits")


def _save_checkpoint(folder: Path) -> Path:
    return save_checkpoint(folder / "c.safetensors", {"w": torch.arange(4096.0)}, {"v": 2})


def _csv(folder: Path) -> Path:
    import tempfile

    with ResultStore(Path(tempfile.mkdtemp()) / "s.sqlite") as store:
        store.add([{"sender": "A", "sender_layer": "stem", "receiver": "B", "receiver_layer": "stem",
                    "objective": "task", "accuracy": 0.5}])  # fmt: skip
        return store.to_csv(folder / "cells.csv")


# (case, how the disk fails, whether an old file is there first, the write, regex its StitchError must match).
# "too small": the file is larger than the whole 256 KiB disk (a ResNet of width 16 is 1.2 MB); "full": the
# disk is filled to the last byte; "read-only": the tmpfs is remounted read-only; "immutable": chattr +i.
WRITE_FAILS: list[tuple[str, str, bool, Callable[[Path], object], str]] = [
    (
        "zoo.save_model bigger than the disk",
        "too small",
        False,
        _save_model(16),
        rf"could not write \S+/R1111\.safetensors: {FULL}{INTACT}",
    ),
    ("zoo.save_model onto a full disk", "full", False, _save_model(4), rf"R1111\.safetensors: {FULL}"),
    ("zoo.save_model over an old file, disk full", "full", True, _save_model(4), rf"R1111\.safetensors: {FULL}"),
    ("zoo.save_model into a read-only folder", "read-only", False, _save_model(4), rf"R1111\.safetensors: {READ_ONLY}"),
    ("zoo.save_model into an immutable folder", "immutable", True, _save_model(4), rf"R1111\.safetensors: {IMMUTABLE}"),
    (
        "save_checkpoint onto a full disk",
        "full",
        False,
        _save_checkpoint,
        rf"could not write \S+/c\.safetensors: {FULL}",
    ),
    ("save_checkpoint over an old file, disk full", "full", True, _save_checkpoint, rf"c\.safetensors: {FULL}"),
    (
        "save_checkpoint over an old file, read-only",
        "read-only",
        True,
        _save_checkpoint,
        rf"c\.safetensors: {READ_ONLY}",
    ),
    ("save_checkpoint into an immutable folder", "immutable", False, _save_checkpoint, rf"c\.safetensors: {IMMUTABLE}"),
    ("a CSV export onto a full disk", "full", True, _csv, rf"could not write \S+/cells\.csv: {FULL}"),
    ("a CSV export into a read-only folder", "read-only", False, _csv, rf"cells\.csv: {READ_ONLY}"),
]


@pytest.mark.parametrize("name, failure, old, write, message", WRITE_FAILS, ids=[c[0] for c in WRITE_FAILS])
def test_a_real_failed_write_is_a_clear_error_and_leaves_nothing_behind(tmpfs, name, failure, old, write, message):
    disk = tmpfs()
    folder = disk.root / "out"
    folder.mkdir()
    if old:
        write(folder)  # the file a failed write must leave intact
    disk.fail(failure, folder)
    before = _snapshot(folder)
    with pytest.raises(ms.StitchError, match=message):
        write(folder)
    assert _snapshot(folder) == before  # the old file intact, no temporary file (ours or safetensors')
    if failure == "too small":
        return
    disk.fail(failure, folder, on=False)
    path = write(folder)  # the disk is healthy again: the same write succeeds
    assert sorted(_snapshot(folder)) == [path.name]
    if path.suffix == ".safetensors":
        load_checkpoint(path)


def test_the_store_on_a_full_disk_is_a_clear_error_and_keeps_its_rows(tmpfs):
    disk = tmpfs()
    row = {"sender": "A", "sender_layer": "stem", "receiver": "B", "receiver_layer": "stem", "objective": "task"}
    with ResultStore(disk.root / "study.sqlite") as store:
        store.add([{**row, "accuracy": 0.5}])
        disk.fill()
        big = [{**row, "sender_layer": f"layer{i}", "recipe": "x" * 4096} for i in range(16)]
        with pytest.raises(ms.StitchError, match=rf"could not write \S+/study\.sqlite: {FULL}"):
            store.add(big)
        with pytest.raises(ms.StitchError, match=rf"study\.sqlite: {FULL}"):
            store.set_meta("notes", "x" * 300_000)
        assert [r["accuracy"] for r in store.rows()] == [0.5]  # rolled back: the old rows, none of the new
        assert store.integrity_check() == "ok"
        disk.free()
        store.add(big)  # room again: the same write goes through
        assert len(store.rows()) == 17


def test_a_store_in_a_read_only_folder_is_a_clear_error(tmpfs):
    disk = tmpfs()
    row = {"sender": "A", "sender_layer": "stem", "receiver": "B", "receiver_layer": "stem", "objective": "task"}
    with ResultStore(disk.root / "study.sqlite") as store:
        store.add([row])
    disk.read_only()  # (a file open for writing keeps a mount from going read-only: the store is closed first)
    with pytest.raises(ms.StitchError, match=r"cannot open the store \S+/study\.sqlite .*choose a writable folder"):
        ResultStore(disk.root / "study.sqlite")  # a sound store: WAL mode must write beside it to open it
    with pytest.raises(ms.StitchError, match=r"cannot open the store \S+/new/study\.sqlite .*Read-only file system"):
        ResultStore(disk.root / "new" / "study.sqlite")
    disk.read_only(False)
    with ResultStore(disk.root / "study.sqlite") as store:
        assert len(store.rows()) == 1 and store.integrity_check() == "ok"


def _study(out: Path) -> ms.Study:
    torch.manual_seed(0)
    nets = {"a": zoo.small_resnet("R1111", width=4).eval(), "b": zoo.small_resnet("R1111", width=4).eval()}
    return ms.Study(
        nets,
        train_data=data.subset(data.digits(), 32),
        test_data=data.subset(data.digits(train=False), 32),
        out=out,
        pairs=[("a", "b")],
        layers={name: ["stem", "layer4.0"] for name in nets},
        recipe=ms.Recipe(batch_size=16, epochs=1),
        device="cpu",
        sanity=False,
    )


@pytest.mark.filterwarnings("ignore:.*optimiser steps")  # a tiny study, on purpose
@pytest.mark.parametrize(
    "failure, reason",
    [("full", FULL), ("read-only", READ_ONLY), ("immutable", IMMUTABLE)],
    ids=["full", "read-only", "immutable"],
)
def test_a_study_whose_store_fits_but_whose_stitch_weights_do_not(tmp_path, tmpfs, failure, reason):
    """The store is on a healthy disk, ``stitches/`` on its own failing one: no half cell, and a rerun finishes."""
    out = tmp_path / "run"
    disk = tmpfs(out / "stitches")
    disk.fail(failure, disk.root)
    study = _study(out)
    stitches = re.escape(str(out / "stitches"))
    with pytest.raises(
        ms.StitchError, match=rf"could not write {stitches}/a__b__task\.[0-9a-f]{{12}}\.safetensors: {reason}"
    ):
        study.run(progress=False)
    assert study.rows() == []  # no row names a file that was not written
    assert not [p for p in (out / "stitches").iterdir() if p.name != "filler.bin"]  # no weights, no temp file

    disk.fail(failure, disk.root, on=False)
    study.run(progress=False)
    rows = study.rows()
    assert len(rows) == 4 and all(r["accuracy"] is not None for r in rows)  # every cell, whole
    (name,) = {r["weights"] for r in rows}
    assert sorted(p.name for p in (out / "stitches").iterdir()) == [name]
    assert len(study.load_cells("a", "b")) == 4
    with ResultStore(study.store_path) as store:
        assert store.integrity_check() == "ok"


def test_a_read_only_cache_folder_falls_back_beside_the_images(tmpfs, tmp_path):
    """The decoded-image cache tries the next place when a real write fails (it used to escape as SafetensorError)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ["cat", "dog"]:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    cache = tmpfs()
    cache.read_only()
    decoded = data.decoded_image_folder(tmp_path / "images", mean=(0.5,) * 3, std=(0.5,) * 3, cache_dir=cache.root)
    assert len(decoded) == 6
    assert (tmp_path / "images.uint8.safetensors").is_file()


# (case, a call that makes a Recipe, regex its StitchError must match)
RECIPE_FAILS: list[tuple[str, Callable[[], object], str]] = [
    ("epochs as a string", lambda: ms.Recipe(epochs="4"), r"^Recipe: epochs must be a finite number > 0, got '4'$"),
    ("infinite epochs", lambda: ms.Recipe(epochs=math.inf), r"epochs must be a finite number > 0, got inf$"),
    ("zero epochs", lambda: ms.Recipe(epochs=0), r"epochs must be a finite number > 0, got 0$"),
    ("epochs True", lambda: ms.Recipe(epochs=True), r"epochs must be a finite number > 0, got True$"),
    ("NaN lr", lambda: ms.Recipe(lr=math.nan), r"^Recipe: lr must be a finite number > 0, got nan$"),
    ("negative lr", lambda: ms.Recipe(lr=-0.1), r"lr must be a finite number > 0, got -0.1$"),
    (
        "lr as a tensor",
        lambda: ms.Recipe(lr=torch.tensor(0.1)),
        r"lr must be a finite number > 0, got tensor\(0.1000\)",
    ),
    ("an int lr too large for a float", lambda: ms.Recipe(lr=10**400), r"lr must be a finite number > 0, got 1000"),
    ("fractional batch_size", lambda: ms.Recipe(batch_size=2.5), r"batch_size must be a whole number >= 1, got 2.5$"),
    (
        "batch_size as a float",
        lambda: ms.Recipe(batch_size=256.0),
        r"batch_size must be a whole number >= 1, got 256.0",
    ),
    ("batch_size True", lambda: ms.Recipe(batch_size=True), r"batch_size must be a whole number >= 1, got True$"),
    ("batch_size 0", lambda: ms.Recipe(batch_size=0), r"batch_size must be a whole number >= 1, got 0$"),
    ("base_batch_size None", lambda: ms.Recipe(base_batch_size=None), r"base_batch_size must be a whole number >= 1"),
    (
        "seed as a word",
        lambda: ms.Recipe(seed="zero"),
        r"^Recipe: seed must be a whole number in \[0, 2\*\*64\), got 'zero'$",
    ),
    ("negative seed", lambda: ms.Recipe(seed=-1), r"seed must be a whole number in \[0, 2\*\*64\), got -1$"),
    ("seed past 64 bits", lambda: ms.Recipe(seed=2**64), r"seed must be a whole number in \[0, 2\*\*64\), got 1844"),
    ("seed False", lambda: ms.Recipe(seed=False), r"seed must be a whole number in \[0, 2\*\*64\), got False$"),
    (
        "fractional patience",
        lambda: ms.Recipe(patience=1.5),
        r"patience must be None or a whole number of epochs >= 1, got 1.5",
    ),
    (
        "patience True",
        lambda: ms.Recipe(patience=True),
        r"patience must be None or a whole number of epochs >= 1, got True",
    ),
    ("patience 0", lambda: ms.Recipe(patience=0), r"patience must be None or a whole number of epochs >= 1, got 0$"),
    ("momentum 1", lambda: ms.Recipe(momentum=1), r"momentum must be a finite number in \[0, 1\), got 1$"),
    ("NaN momentum", lambda: ms.Recipe(momentum=math.nan), r"momentum must be a finite number in \[0, 1\), got nan$"),
    (
        "infinite weight_decay",
        lambda: ms.Recipe(weight_decay=math.inf),
        r"weight_decay must be a finite number >= 0, got inf",
    ),
    (
        "weight_decay as a string",
        lambda: ms.Recipe(weight_decay="0"),
        r"weight_decay must be a finite number >= 0, got '0'",
    ),
    ("warmup 1", lambda: ms.Recipe(warmup=1), r"warmup is a fraction of all steps, a number in \[0, 1\), got 1$"),
    (
        "NaN warmup",
        lambda: ms.Recipe(warmup=math.nan),
        r"warmup is a fraction of all steps, a number in \[0, 1\), got nan",
    ),
    (
        "holdout as a percent",
        lambda: ms.Recipe(holdout=15),
        r"holdout is a fraction of the training data, a number in \[0, 1\), got 15",
    ),
    ("NaN holdout", lambda: ms.Recipe(holdout=math.nan), r"holdout is a fraction of the training data.*got nan$"),
    (
        "infinite grad_clip",
        lambda: ms.Recipe(grad_clip=math.inf),
        r"grad_clip must be None or a finite number > 0, got inf$",
    ),
    ("grad_clip 0", lambda: ms.Recipe(grad_clip=0), r"grad_clip must be None or a finite number > 0, got 0$"),
    (
        "NaN min_delta",
        lambda: ms.Recipe(min_delta=math.nan, patience=2),
        r"min_delta is a rise in accuracy, a number in \[0, 1\), got nan",
    ),
    (
        "min_delta without patience",
        lambda: ms.Recipe(min_delta=0.01),
        r"min_delta only applies with patience=N, got min_delta=0.01 and patience=None",
    ),
    ("nesterov 1", lambda: ms.Recipe(nesterov=1), r"nesterov must be True or False, got 1$"),
    (
        "nesterov without momentum",
        lambda: ms.Recipe(nesterov=True, momentum=0),
        r"nesterov=True needs momentum > 0, got momentum=0$",
    ),
    ("unknown optim", lambda: ms.Recipe(optim="adam"), r"optim must be 'sgd' or 'adamw', got 'adam'$"),
    (
        "nesterov with adamw",
        lambda: ms.Recipe(optim="adamw", nesterov=True),
        r"nesterov=True is SGD's; optim='adamw' has no Nesterov momentum$",
    ),
    (
        "channels_last as a string",
        lambda: ms.Recipe(channels_last="yes"),
        r"channels_last must be True or False, got 'yes'$",
    ),
    ("amp 1", lambda: ms.Recipe(amp=1), r"amp must be None \(CUDA only\), True or False, got 1$"),
    ("amp as a string", lambda: ms.Recipe(amp="cuda"), r"amp must be None \(CUDA only\), True or False, got 'cuda'$"),
    (
        "amp_dtype as a torch dtype",
        lambda: ms.Recipe(amp_dtype=torch.bfloat16),
        r"amp_dtype must be 'bfloat16' or 'float16', got torch.bfloat16",
    ),
    ("unknown init", lambda: ms.Recipe(init="zeros"), r"init must be 'lstsq', 'random' or 'identity', got 'zeros'$"),
    (
        "a bad field through replace",
        lambda: ms.Recipe().replace(epochs="4"),
        r"epochs must be a finite number > 0, got '4'",
    ),
    (
        "a bad field through paper",
        lambda: ms.Recipe.paper(batch_size=1.5),
        r"batch_size must be a whole number >= 1, got 1.5",
    ),
]


@pytest.mark.parametrize("name, call, message", RECIPE_FAILS, ids=[c[0] for c in RECIPE_FAILS])
def test_a_bad_recipe_field_is_refused_by_name(name, call, message):
    with pytest.raises(ms.StitchError, match=message):
        call()


def test_valid_recipe_numbers_are_kept_and_numpy_ones_become_python_ones():
    plain = ms.Recipe(lr=1, epochs=0.5, batch_size=128, grad_clip=2, patience=3, min_delta=0.01, seed=2**64 - 1)
    assert (plain.lr, plain.epochs, plain.grad_clip) == (1, 0.5, 2)
    assert repr(plain).startswith("Recipe(lr=1, momentum=0.5, weight_decay=0.01, batch_size=128, epochs=0.5,")
    numpy = ms.Recipe(
        lr=np.float64(0.02), batch_size=np.int64(128), epochs=np.int32(2), nesterov=np.bool_(True), amp=np.bool_(False)
    )
    assert numpy == ms.Recipe(lr=0.02, batch_size=128, epochs=2, nesterov=True, amp=False)
    assert repr(numpy) == repr(ms.Recipe(lr=0.02, batch_size=128, epochs=2, nesterov=True, amp=False))
    assert [type(numpy.lr), type(numpy.batch_size), type(numpy.epochs), type(numpy.nesterov)] == [float, int, int, bool]


def test_every_recipe_field_has_a_rule():
    import dataclasses

    from modelstitch.train._recipe import _RULES

    assert list(_RULES) == [f.name for f in dataclasses.fields(ms.Recipe)]
