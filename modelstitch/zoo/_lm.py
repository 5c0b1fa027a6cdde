"""Small GPT-2-style language models for offline studies: built from a config, trained here, kept as safetensors.

`tiny_gpt2` builds a HuggingFace ``GPT2LMHeadModel`` over the byte vocabulary
(`modelstitch.data.BYTE_VOCAB`), so a study over language models needs no
tokenizer file and no download; `train_classifier` trains it on next-token
prediction (its task, see `modelstitch.train.task_of`) with `LM_RECIPE`;
`save_language_model` and `load_language_model` keep it with its config.
``transformers`` is an optional extra (``pip install "modelstitch[lm]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import StitchError
from ..core import load_checkpoint, save_checkpoint
from ..data import BYTE_VOCAB
from ..train import Recipe

__all__ = ["LM_RECIPE", "block_names", "load_language_model", "save_language_model", "tiny_gpt2"]

LM_RECIPE = Recipe(
    optim="adamw",
    lr=3e-3,
    batch_size=16,
    base_batch_size=16,
    momentum=0.9,
    weight_decay=0.01,
    epochs=1.5,
    warmup=0.05,
    grad_clip=1.0,
)
"""How `tiny_gpt2` models are trained from scratch: AdamW at 3e-3, batch 16, 1.5 epochs, 5% warmup then cosine.

Gradients are clipped at norm 1. Chosen for the ``lm-quick`` preset by trying
batch 16 and 32 and peak rates 2e-3 to 1e-2 for one epoch on `pydoc_corpus`
(a 4-block width-64 model on the 2-core development CPU): batch 16 at 3e-3 had
the lowest test loss for the time.
"""

_BLOCK_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "bert.encoder.layer", "encoder.layer", "layers")
"""Where HuggingFace models keep their blocks (GPT-2, Llama/Mistral/Qwen, GPT-NeoX, BERT, bare encoders)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise StitchError('language models need HuggingFace transformers: pip install "modelstitch[lm]"') from None
    return transformers


def tiny_gpt2(
    layers: int = 4,
    *,
    width: int = 64,
    heads: int = 4,
    seq_len: int = 64,
    vocab_size: int = BYTE_VOCAB,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised GPT-2 language model, small enough to train on a CPU in a minute.

    Dropout is off (the model is a frozen network of a study once trained)
    and the activation is PyTorch's exact GELU. The global RNG is left as it
    was: the same arguments give bitwise the same weights, so ``seed`` alone
    makes a random-weight control.

    Args:
        layers: transformer blocks.
        width: the residual stream's size (``n_embd``), a multiple of ``heads``.
        heads: attention heads per block.
        seq_len: the longest sequence (``n_positions``).
        vocab_size: token ids ``[0, vocab_size)``; the byte vocabulary by default.
        seed: seeds the initial weights.

    Returns:
        A ``transformers.GPT2LMHeadModel`` in eval mode; ``model.architecture``
        names it (``"gpt2-L4-W64"``).

    Raises:
        StitchError: ``transformers`` is not installed, or a size is not a positive int.

    Examples:
        >>> model = tiny_gpt2(2, width=32, seed=0)
        >>> model.architecture, block_names(model)
        ('gpt2-L2-W32', ['transformer.h.0', 'transformer.h.1'])
    """
    for name, value in (("layers", layers), ("width", width), ("heads", heads), ("seq_len", seq_len),
                        ("vocab_size", vocab_size), ("seed", seed)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise StitchError(f"tiny_gpt2: {name} must be a positive int, got {value!r}")
    if width % heads:
        raise StitchError(f"tiny_gpt2: width={width} must be a multiple of heads={heads}")
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    model.architecture = f"gpt2-L{layers}-W{width}"
    return model.eval()


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks of a HuggingFace model, in forward order: the places a stitch goes between LMs.

    Raises:
        StitchError: the model keeps no `nn.ModuleList` of blocks where
            HuggingFace models do (``transformer.h``, ``model.layers``,
            ``bert.encoder.layer``, ...).
    """
    modules = dict(model.named_modules())
    for path in _BLOCK_LISTS:
        blocks = modules.get(path)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return [f"{path}.{i}" for i in range(len(blocks))]
    raise StitchError(
        f"{type(model).__name__} has no list of transformer blocks at {', '.join(_BLOCK_LISTS)}; name the layers "
        "to stitch yourself (see model.named_modules())"
    )


def save_language_model(
    path: str | os.PathLike[str], model: nn.Module, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save a HuggingFace language model's weights and config as one ``.safetensors`` file (atomically).

    Args:
        path: the file to write.
        model: a ``transformers`` model (``model.config`` is recorded).
        metadata: more JSON-encodable values (what it was trained on, its test loss...).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise StitchError(f"save_language_model: {type(model).__name__} has no HuggingFace config to record")
    meta = {
        **dict(metadata or {}),
        "family": "transformers",
        "model_class": type(model).__name__,
        "config": config.to_dict(),
        "architecture": getattr(model, "architecture", None),
    }
    return save_checkpoint(path, model, meta)


def load_language_model(path: str | os.PathLike[str]) -> nn.Module:
    """A model saved by `save_language_model`, rebuilt from its config, in eval mode.

    Its ``checkpoint_metadata`` attribute holds the file's metadata.

    Raises:
        StitchError: the file is missing or holds no language model, or its weights do not fit its config.
    """
    state, meta = load_checkpoint(path)
    if meta.get("family") != "transformers" or "config" not in meta:
        raise StitchError(f"{os.fspath(path)!r} holds no language model saved by save_language_model")
    transformers = _transformers()
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise StitchError(f"{os.fspath(path)!r} holds a {meta['model_class']}, which this transformers lacks")
    config = transformers.AutoConfig.for_model(**meta["config"])
    with torch.random.fork_rng(devices=[]):
        model = cls(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise StitchError(f"{os.fspath(path)!r}: its weights do not fit its config ({err})") from None
    if meta.get("architecture"):
        model.architecture = meta["architecture"]
    model.checkpoint_metadata = meta
    return model.eval()
