"""Text for language models: byte-level tokens, fixed-length token sequences, and an offline English corpus.

Everything here works without a tokenizer file or a download: `byte_tokens`
reads a text's UTF-8 bytes as token ids in ``[0, 256)`` (`BYTE_VOCAB`), and
`pydoc_corpus` is English text that ships with Python itself. A tokenizer
(any callable, or a HuggingFace tokenizer object) can be passed instead, but
this module never imports ``transformers``.

Examples:
    >>> train, test = text_splits(pydoc_corpus(), 64, limit=100)
    >>> len(train), len(test), train.seq_len, train.vocab_size
    (100, 100, 64, 256)
    >>> sorted(train[0])
    ['attention_mask', 'input_ids', 'labels']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .._errors import StitchError

__all__ = [
    "BYTE_VOCAB",
    "IGNORE_INDEX",
    "TokenSequences",
    "byte_tokens",
    "decode_bytes",
    "pack_text",
    "pydoc_corpus",
    "text_splits",
]

BYTE_VOCAB: int = 256
"""Size of the byte-level vocabulary of `byte_tokens`: one token per byte value."""

IGNORE_INDEX: int = -100
"""The label that a loss skips (HuggingFace's and `torch.nn.CrossEntropyLoss`'s ``ignore_index``)."""

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

Tokenizer = Callable[[str], Any]
"""A callable ``str -> list[int] | tensor``, or a HuggingFace tokenizer (called, its ``"input_ids"`` read)."""


def byte_tokens(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as token ids: a byte-level vocabulary of `BYTE_VOCAB` (256) tokens.

    No tokenizer file is needed; every text has a tokenization and
    `decode_bytes` reverses it exactly. A non-ASCII character becomes
    several tokens (two to four).

    Args:
        text: any string.

    Returns:
        int64 ids ``[len(text.encode("utf-8"))]``, each in ``[0, 256)``.

    Raises:
        StitchError: ``text`` is not a str.

    Examples:
        >>> byte_tokens("hé")
        tensor([104, 195, 169])
    """
    if not isinstance(text, str):
        raise StitchError(f"byte_tokens needs a str, got {type(text).__name__}")
    data = text.encode("utf-8")
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode_bytes(ids: torch.Tensor | Sequence[int]) -> str:
    """The text whose UTF-8 bytes are ``ids`` (the inverse of `byte_tokens`).

    Bytes that do not form valid UTF-8 (a sequence cut in the middle of a
    character, a model's sample) become U+FFFD (``errors="replace"``).

    Args:
        ids: token ids ``[T]`` in ``[0, 256)``, a tensor or a sequence of ints.

    Returns:
        The decoded text.

    Raises:
        StitchError: ``ids`` is not one-dimensional, or holds a value outside
            ``[0, 256)`` (such as the ``-100`` of ignored labels; drop those first).

    Examples:
        >>> decode_bytes(byte_tokens("naïve café"))
        'naïve café'
        >>> decode_bytes([104, 195])  # a character cut in two
        'h\ufffd'
    """
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.int64)
    if t.dim() != 1 or (t.numel() and t.dtype not in _INT_DTYPES):
        raise StitchError(f"decode_bytes needs one sequence of integer ids [T], got {t.dtype} {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= BYTE_VOCAB):
        bad = t[(t < 0) | (t >= BYTE_VOCAB)][0]
        raise StitchError(
            f"decode_bytes: byte ids must be in [0, {BYTE_VOCAB}), got {int(bad)}"
            + ("; drop the ignored labels (-100) first" if int(bad) == IGNORE_INDEX else "")
        )
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class TokenSequences(Dataset):
    """``N`` token sequences of length ``T`` for a language model, each a dict of ``input_ids``, mask and labels.

    Indexing gives ``{"input_ids": [T], "attention_mask": [T], "labels": [T]}``
    (int64), so the default DataLoader collate makes dict batches of
    ``[B, T]`` tensors that a HuggingFace model takes as ``model(**batch)``.
    The labels follow the HuggingFace convention for causal language models:
    they are the inputs themselves (the model shifts them by one), with
    `IGNORE_INDEX` (-100) where the loss must skip a position.

    Args:
        input_ids: integer token ids ``[N, T]``, each ``>= 0``; any integer
            dtype (stored as int64), or nested lists.
        attention_mask: ``[N, T]`` of 0 and 1 (1 = a real token, 0 =
            padding); all ones by default.
        labels: ``[N, T]`` integer targets, each ``-100`` or a token id; by
            default a copy of ``input_ids`` with -100 where the mask is 0.
        vocab_size: the vocabulary the ids come from; by default the largest
            id (in ``input_ids`` and ``labels``) plus one.

    Attributes:
        input_ids: int64 ``[N, T]``.
        attention_mask: int64 ``[N, T]``.
        labels: int64 ``[N, T]``.
        vocab_size: as above.
        seq_len: ``T``.

    Raises:
        StitchError: ids that are not a 2-D integer tensor, are negative or
            reach ``vocab_size``; no sequences (``N == 0``) or empty ones
            (``T == 0``); a mask or labels of another shape; a mask value
            other than 0 and 1; a label that is neither -100 nor an id in
            the vocabulary.

    Examples:
        >>> data = TokenSequences(torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        >>> data[1]["labels"]
        tensor([   8,    9, -100])
        >>> len(data), data.seq_len, data.vocab_size
        (2, 3, 10)
        >>> batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
        >>> {k: tuple(v.shape) for k, v in batch.items()}
        {'input_ids': (2, 3), 'attention_mask': (2, 3), 'labels': (2, 3)}
    """

    def __init__(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
        labels: torch.Tensor | Sequence[Sequence[int]] | None = None,
        *,
        vocab_size: int | None = None,
    ) -> None:
        ids = _integer_tensor(input_ids, "input_ids")
        if ids.dim() != 2:
            raise StitchError(f"TokenSequences: input_ids must be [N, T], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise StitchError(
                f"TokenSequences: input_ids of shape {tuple(ids.shape)} hold no tokens; "
                "need at least one sequence (N >= 1) of at least one token (T >= 1)"
            )
        if int(ids.min()) < 0:
            raise StitchError(
                f"TokenSequences: token ids must be >= 0, but input_ids {tuple(ids.shape)} hold {int(ids.min())}"
            )
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = torch.as_tensor(attention_mask)
            _same_shape(mask, ids, "attention_mask")
            if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
                bad = mask[(mask != 0) & (mask != 1)][0]
                raise StitchError(
                    f"TokenSequences: attention_mask {tuple(mask.shape)} must hold only 0 (padding) and "
                    f"1 (real token), got {bad.item()!r}"
                )
            mask = mask.to(device=ids.device, dtype=torch.int64)
        if labels is None:
            targets = ids.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            targets = _integer_tensor(labels, "labels").to(ids.device)
            _same_shape(targets, ids, "labels")
            wrong = (targets < 0) & (targets != IGNORE_INDEX)
            if bool(wrong.any()):
                raise StitchError(
                    f"TokenSequences: labels {tuple(targets.shape)} must be token ids or {IGNORE_INDEX} (ignored), "
                    f"got {int(targets[wrong][0])}"
                )
        top = max(int(ids.max()), int(targets.max()))
        if vocab_size is None:
            vocab_size = top + 1
        elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise StitchError(f"TokenSequences: vocab_size must be a positive int or None, got {vocab_size!r}")
        elif top >= vocab_size:
            where = "input_ids" if int(ids.max()) == top else "labels"
            raise StitchError(f"TokenSequences: {where} hold the id {top}, outside vocab_size={vocab_size}")
        self.input_ids, self.attention_mask, self.labels = ids, mask, targets
        self.vocab_size: int = vocab_size
        self.seq_len: int = int(ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    def __repr__(self) -> str:
        return f"TokenSequences(N={len(self)}, seq_len={self.seq_len}, vocab_size={self.vocab_size})"

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TokenSequences:
        """The sequences at ``indices`` (in that order), as a `TokenSequences` with the same ``vocab_size``.

        Examples:
            >>> TokenSequences(torch.arange(12).view(4, 3)).subset([2, 0]).input_ids
            tensor([[6, 7, 8],
                    [0, 1, 2]])
        """
        index = torch.as_tensor(indices, dtype=torch.long, device=self.input_ids.device).reshape(-1)
        if index.numel() and not (-len(self) <= int(index.min()) and int(index.max()) < len(self)):
            raise StitchError(f"TokenSequences.subset: indices must be in [0, {len(self)}), got {index.tolist()}")
        return TokenSequences(
            self.input_ids[index], self.attention_mask[index], self.labels[index], vocab_size=self.vocab_size
        )

    def with_labels(self, labels: torch.Tensor | Sequence[Sequence[int]]) -> TokenSequences:
        """The same sequences and mask (shared, not copied) with other ``labels`` ``[N, T]``.

        Examples:
            >>> data = TokenSequences(torch.tensor([[1, 2, 3]]))
            >>> data.with_labels(torch.tensor([[-100, 2, 3]]))[0]["labels"]
            tensor([-100,    2,    3])
        """
        return TokenSequences(self.input_ids, self.attention_mask, labels, vocab_size=self.vocab_size)


def pack_text(
    text_or_ids: str | torch.Tensor | Sequence[int],
    seq_len: int,
    *,
    stride: int | None = None,
    tokenizer: Tokenizer | None = None,
    limit: int | None = None,
    vocab_size: int | None = None,
) -> TokenSequences:
    """Cut one long text (or stream of token ids) into fixed-length sequences, as for language-model training.

    The text becomes one stream of ids (through ``tokenizer``, or else
    `byte_tokens`), and sequence ``i`` is ``ids[i * stride : i * stride +
    seq_len]``. The incomplete tail is dropped, so there is no padding: every
    mask is all ones and every label is the token itself.

    Args:
        text_or_ids: a text, or token ids ``[L]`` already made.
        seq_len: tokens per sequence ``T``, at least 2 (a causal model
            predicts each token from the ones before it).
        stride: tokens between the starts of consecutive sequences;
            ``seq_len`` (the default) gives non-overlapping sequences, less
            gives overlapping ones, more skips tokens between them.
        tokenizer: a callable ``str -> list[int]`` (or a 1-D tensor), or a
            HuggingFace tokenizer (it is called and its ``"input_ids"`` are
            read; a ``[1, L]`` tensor from ``return_tensors="pt"`` is fine).
            To leave out special tokens, pass
            ``lambda s: tok(s, add_special_tokens=False)["input_ids"]``. An
            object with only an ``encode`` method (tiktoken) also works.
        limit: keep only the first ``limit`` sequences.
        vocab_size: the vocabulary of the ids; by default `BYTE_VOCAB` for
            byte tokens, ``len(tokenizer)`` for a tokenizer that has a length
            (or its ``vocab_size``), else the largest id in the whole stream
            plus one (not only in the sequences kept).

    Returns:
        A `TokenSequences` of ``[N, seq_len]`` with ``N = (L - seq_len) //
        stride + 1`` (at most ``limit``).

    Raises:
        StitchError: ``seq_len`` is not an int >= 2, ``stride`` or ``limit``
            not a positive int, the tokenizer gave something other than one
            sequence of integer ids, or the text has fewer than ``seq_len`` tokens.

    Examples:
        >>> pack_text("abcdefgh", 3).input_ids  # the tail "gh" is dropped
        tensor([[ 97,  98,  99],
                [100, 101, 102]])
        >>> [decode_bytes(row) for row in pack_text("abcdefgh", 3, stride=2).input_ids]
        ['abc', 'cde', 'efg']
    """
    seq_len = _positive_int(seq_len, "seq_len", minimum=2, why=" (a causal model needs a token to predict)")
    stride = seq_len if stride is None else _positive_int(stride, "stride")
    limit = None if limit is None else _positive_int(limit, "limit")
    ids, vocab_size = _token_stream(text_or_ids, tokenizer, vocab_size)
    n = int(ids.shape[0])
    if n < seq_len:
        raise StitchError(
            f"pack_text: the text has {n} tokens, but a sequence of seq_len={seq_len} needs {seq_len}; "
            "use a longer text or a smaller seq_len"
        )
    windows = ids.unfold(0, seq_len, stride)  # [N, seq_len], a view of the stream
    if limit is not None:
        windows = windows[:limit]
    return TokenSequences(windows.clone(), vocab_size=vocab_size)


def pydoc_corpus() -> str:
    """About 465,000 characters of English prose that ships with Python: the help topics of ``pydoc``.

    The text is the standard library's ``pydoc_data.topics.topics`` (what
    ``help("if")`` and the other topics print: the language reference's
    sections), the topics joined in sorted order by blank lines. It needs no
    download and no package, and is the same on every machine with the same
    Python version, which makes it the text corpus for quick checks and tests.
    It is mostly ASCII, so with `byte_tokens` it is about 466,000 tokens.

    Returns:
        The corpus.

    Raises:
        StitchError: this Python build lacks the ``pydoc_data`` module (some
            minimal builds leave it out).

    Examples:
        >>> text = pydoc_corpus()
        >>> len(text) > 400_000, text == pydoc_corpus()
        (True, True)
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise StitchError(
            "pydoc_corpus reads the standard-library module pydoc_data (pydoc_data.topics), which this Python "
            "build lacks; install a full Python, or pass your own text to pack_text"
        ) from None
    return "\n\n".join(topics[name] for name in sorted(topics))


def text_splits(
    text: str | torch.Tensor | Sequence[int],
    seq_len: int,
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    stride: int | None = None,
    tokenizer: Tokenizer | None = None,
    limit: int | None = None,
    vocab_size: int | None = None,
) -> tuple[TokenSequences, TokenSequences]:
    """A train and a test split of one text, as two contiguous blocks: no test sequence overlaps a training one.

    The text becomes one stream of ids (see `pack_text`); the last
    ``test_fraction`` of the stream (rounded to whole tokens, at least one) is
    the test block, the rest is the training block, and each block is packed
    into sequences with `pack_text` on its own. Because the blocks do not
    share a token, a test sequence is never seen in training, even with an
    overlapping ``stride`` (a random split of overlapping windows would leak).
    Both splits have the same ``vocab_size``.

    Args:
        text: the text, or token ids ``[L]``.
        seq_len: tokens per sequence (at least 2).
        test_fraction: share of the stream in the test block, in (0, 1).
        seed: which sequences ``limit`` keeps; without ``limit`` the split
            does not depend on it.
        stride: as in `pack_text` (both splits).
        tokenizer: as in `pack_text`; the whole text is tokenized once,
            before it is cut.
        limit: keep at most ``limit`` sequences in each split, the first
            ``limit`` of a permutation seeded by ``seed`` (kept in text
            order), so a small run still samples the whole block.
        vocab_size: as in `pack_text`.

    Returns:
        ``(train, test)``, two `TokenSequences` of ``[N, seq_len]``.

    Raises:
        StitchError: ``test_fraction`` is not in (0, 1), or a block is too
            short for one sequence (the message says which), or as in `pack_text`.

    Examples:
        >>> train, test = text_splits(torch.arange(100), 10, test_fraction=0.2)
        >>> len(train), len(test), int(train.input_ids.max()), int(test.input_ids.min())
        (8, 2, 79, 80)
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise StitchError(f"text_splits: test_fraction must be a number in (0, 1), got {test_fraction!r}")
    seq_len = _positive_int(seq_len, "seq_len", minimum=2, why=" (a causal model needs a token to predict)")
    limit = None if limit is None else _positive_int(limit, "limit")
    ids, vocab_size = _token_stream(text, tokenizer, vocab_size)
    n = int(ids.shape[0])
    n_test = min(n, max(1, round(n * test_fraction)))
    blocks = {"train": ids[: n - n_test], "test": ids[n - n_test :]}
    splits = []
    for name, block in blocks.items():
        if block.shape[0] < seq_len:
            raise StitchError(
                f"text_splits: the {name} block ({'last' if name == 'test' else 'first'} "
                f"{(test_fraction if name == 'test' else 1 - test_fraction):.0%} of {n} tokens) has "
                f"{block.shape[0]} tokens, but a sequence of seq_len={seq_len} needs {seq_len}; "
                "use a longer text, a smaller seq_len or another test_fraction"
            )
        packed = pack_text(block, seq_len, stride=stride, vocab_size=vocab_size)
        if limit is not None and len(packed) > limit:
            order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed))
            packed = packed.subset(order[:limit].sort().values)
        splits.append(packed)
    return splits[0], splits[1]


def _token_stream(
    text_or_ids: str | torch.Tensor | Sequence[int], tokenizer: Tokenizer | None, vocab_size: int | None
) -> tuple[torch.Tensor, int | None]:
    """One 1-D int64 stream of ids and its vocabulary size (by default as `pack_text` says, from the whole stream)."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            return byte_tokens(text_or_ids), BYTE_VOCAB if vocab_size is None else vocab_size
        ids = _tokenize(text_or_ids, tokenizer)
        vocab_size = _tokenizer_vocab(tokenizer) if vocab_size is None else vocab_size
    else:
        if tokenizer is not None:
            raise StitchError("pack_text: a tokenizer applies to a text (str), but token ids were given")
        ids = _integer_tensor(text_or_ids, "the token ids", "pack_text")
        if ids.dim() != 1:
            raise StitchError(f"pack_text: token ids must be one stream [L], got shape {tuple(ids.shape)}")
    if vocab_size is None and ids.numel() and int(ids.min()) >= 0:  # the whole stream's, so every split agrees
        vocab_size = int(ids.max()) + 1
    return ids, vocab_size


def _tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """``text`` through ``tokenizer`` (callable or ``.encode``), read as one 1-D int64 stream."""
    if callable(tokenizer):
        out = tokenizer(text)
    elif callable(getattr(tokenizer, "encode", None)):
        out = tokenizer.encode(text)
    else:
        raise StitchError(
            f"pack_text: tokenizer must be a callable str -> ids (or have an encode method), "
            f"got {type(tokenizer).__name__}"
        )
    if not isinstance(out, torch.Tensor) and callable(getattr(out, "keys", None)):  # an HF BatchEncoding, a dict
        if "input_ids" not in out:
            raise StitchError(f"pack_text: the tokenizer returned keys {sorted(out.keys())} but no 'input_ids'")
        out = out["input_ids"]
    try:
        ids = torch.as_tensor(out.tolist() if hasattr(out, "tolist") and not isinstance(out, torch.Tensor) else out)
    except (TypeError, ValueError, RuntimeError) as err:
        raise StitchError(f"pack_text: the tokenizer's output is not a list of token ids ({err})") from None
    if ids.dim() == 2 and ids.shape[0] == 1:  # return_tensors="pt" gives [1, L]
        ids = ids[0]
    if ids.dim() != 1 or (ids.numel() and ids.dtype not in _INT_DTYPES):
        raise StitchError(
            f"pack_text: the tokenizer must give one sequence of integer ids, got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids.to(torch.int64)


def _tokenizer_vocab(tokenizer: Any) -> int | None:
    """``len(tokenizer)`` (an HF tokenizer's size with added tokens), else its ``vocab_size``, else ``None``."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _integer_tensor(values: Any, what: str, owner: str = "TokenSequences") -> torch.Tensor:
    """``values`` as an int64 tensor, refusing floats and bools with a message naming ``what`` and the shape."""
    try:
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise StitchError(f"{owner}: {what} must be integer token ids, got {type(values).__name__} ({err})") from None
    empty_list = t.numel() == 0 and not isinstance(values, torch.Tensor)  # torch.as_tensor([]) is float32
    if t.dtype not in _INT_DTYPES and not empty_list:
        raise StitchError(f"{owner}: {what} must be integer token ids, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _same_shape(t: torch.Tensor, ids: torch.Tensor, what: str) -> None:
    if t.shape != ids.shape:
        raise StitchError(
            f"TokenSequences: {what} has shape {tuple(t.shape)} but input_ids have shape {tuple(ids.shape)}; "
            "they must match"
        )


def _positive_int(value: Any, name: str, *, minimum: int = 1, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StitchError(f"{name} must be an int >= {minimum}{why}, got {value!r}")
    return value
