"""Checkpoints as ``.safetensors`` files: weights plus a JSON metadata record.

A checkpoint is one safetensors file. Its tensors are the model's state dict;
its header's string metadata holds a single key, ``"modelstitch"``, whose value
is a JSON object with at least ``library_version`` and ``format``. Nothing is
ever pickled, so loading a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._errors import StitchError
from .._version import __version__
from ._files import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "METADATA_KEY", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout this library writes (``metadata["format"]``)."""

METADATA_KEY = "modelstitch"
"""The one safetensors header metadata key this library writes and reads."""


def save_checkpoint(
    path: str | os.PathLike[str],
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights and metadata to ``path`` as one ``.safetensors`` file.

    The write is atomic: the file is written under a temporary name in the
    same folder and then renamed over ``path``, so a crash leaves either the
    old file or the new one, never half of one. Missing parent folders are
    created.

    Args:
        path: where to write; conventionally ends in ``.safetensors``.
        model_or_state_dict: a module (its ``state_dict()`` is saved) or a
            mapping of names to tensors. Tensors are copied to the CPU and made
            contiguous; the originals are not touched.
        metadata: JSON-serialisable values describing the weights. The keys
            ``library_version`` and ``format`` are always set by this function.

    Returns:
        ``path`` as a `pathlib.Path`.

    Raises:
        StitchError: a value in the state dict is not a tensor,
            ``metadata`` cannot be written as JSON, or the file cannot be
            written (a full disk, a read-only folder: the message names the
            file and the reason; ``path`` is left as it was and no temporary
            file remains).

    Examples:
        >>> import tempfile, pathlib
        >>> folder = tempfile.TemporaryDirectory()
        >>> p = save_checkpoint(pathlib.Path(folder.name) / "lin.safetensors", torch.nn.Linear(2, 3), {"note": "demo"})
        >>> state, meta = load_checkpoint(p)
        >>> sorted(state), meta["note"], meta["format"]
        (['bias', 'weight'], 'demo', 1)
        >>> folder.cleanup()
    """
    path = Path(path)
    state = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    )
    if not isinstance(state, Mapping):
        raise StitchError(
            f"save_checkpoint: expected an nn.Module or a dict of tensors, got {type(model_or_state_dict).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise StitchError(
                f"save_checkpoint: state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "only tensors can be stored in a safetensors file"
            )
        # clone: safetensors refuses tensors that share storage (tied weights, views).
        tensors[str(name)] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    record = dict(metadata or {})
    record["library_version"] = __version__
    record["format"] = CHECKPOINT_FORMAT
    try:
        header = json.dumps(record, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise StitchError(f"save_checkpoint: metadata must be JSON-serialisable ({err})") from None

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: header})
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    Only the safetensors format is read; nothing is unpickled.

    Args:
        path: a ``.safetensors`` file written by this library.

    Returns:
        ``(state_dict, metadata)``: the tensors (on the CPU) and the decoded
        JSON metadata.

    Raises:
        StitchError: the file does not exist, is not a safetensors file, was
            not written by modelstitch, or uses a newer checkpoint format.
    """
    path = Path(path)
    if not path.is_file():
        raise StitchError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StitchError(f"{str(path)!r} is not a readable .safetensors checkpoint ({err})") from None
    if METADATA_KEY not in header:
        raise StitchError(
            f"{str(path)!r} is a safetensors file but not a modelstitch checkpoint "
            f"(its header has no {METADATA_KEY!r} metadata)"
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise StitchError(f"{str(path)!r}: its {METADATA_KEY!r} metadata is not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise StitchError(f"{str(path)!r}: its {METADATA_KEY!r} metadata is not a JSON object")
    fmt = metadata.get("format")
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise StitchError(
            f"{str(path)!r} has checkpoint format {fmt!r}; this modelstitch ({__version__}) reads format "
            f"{CHECKPOINT_FORMAT} or older: upgrade modelstitch"
        )
    return state, metadata
