"""Tests for modelstitch.core._checkpoint: safetensors files with JSON metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modelstitch._errors import StitchError
from modelstitch._version import __version__
from modelstitch.core._checkpoint import CHECKPOINT_FORMAT, METADATA_KEY, load_checkpoint, save_checkpoint


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(3, 4, generator=g),
        "w16": torch.randn(5, generator=g).half(),
        "wbf16": torch.randn(2, 2, generator=g).bfloat16(),
        "steps": torch.tensor(17, dtype=torch.int64),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def test_round_trip_is_bitwise(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "c.safetensors", state, {"architecture": "R1111", "acc": 0.5, "list": [1, 2]})
    loaded, meta = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v)
    assert meta == {
        "architecture": "R1111", "acc": 0.5, "list": [1, 2], "library_version": __version__,
        "format": CHECKPOINT_FORMAT,
    }  # fmt: skip
    assert not state["transposed"].is_contiguous()  # the caller's tensor is untouched


def test_header_holds_one_json_key(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", nn.Linear(2, 3), {"a": 1})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert set(header) == {METADATA_KEY}
    assert json.loads(header[METADATA_KEY])["a"] == 1


def test_module_with_tied_weights(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "tied.safetensors", model, {}))
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "c.safetensors"
    save_checkpoint(path, _state(), {"v": 1})
    save_checkpoint(path, _state(), {"v": 2})  # overwrite
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.safetensors"]
    assert load_checkpoint(path)[1]["v"] == 2


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state(), {"v": 1})
    with pytest.raises(StitchError, match="JSON"):
        save_checkpoint(path, _state(), {"v": object()})
    with pytest.raises(StitchError, match="not a tensor"):
        save_checkpoint(path, {"x": 3}, {})  # type: ignore[dict-item]
    assert load_checkpoint(path)[1]["v"] == 1

    # The rename itself fails (the target is a folder): the temp file must go.
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    with pytest.raises(
        StitchError, match=r"could not write .*taken.safetensors: Is a directory \(a folder or file is in the way"
    ):
        save_checkpoint(folder, _state(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "taken.safetensors"]


def test_refuses_files_that_are_not_safetensors(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint")
    with pytest.raises(StitchError, match="not a readable"):
        load_checkpoint(text)

    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(StitchError, match="not a readable"):
        load_checkpoint(pickle)

    with pytest.raises(StitchError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_refuses_foreign_or_newer_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(StitchError, match="not a modelstitch checkpoint"):
        load_checkpoint(foreign)

    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, str(newer), metadata={METADATA_KEY: json.dumps({"format": 99})})
    with pytest.raises(StitchError, match="upgrade"):
        load_checkpoint(newer)
