"""Text data for language models: byte tokens, token sequences, packing, the pydoc corpus and contiguous splits."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import modelstitch as ms
from modelstitch import data
from modelstitch.data import (
    BYTE_VOCAB,
    TokenSequences,
    byte_tokens,
    decode_bytes,
    pack_text,
    pydoc_corpus,
    text_splits,
)


def test_byte_tokens_round_trip_including_non_ascii():
    text = "Grüße, 世界! 🙂 naïve\n"
    ids = byte_tokens(text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # several bytes per non-ASCII character
    assert int(ids.min()) >= 0 and int(ids.max()) < BYTE_VOCAB == 256
    assert decode_bytes(ids) == text
    assert decode_bytes(ids.tolist()) == text
    assert byte_tokens("").shape == (0,) and decode_bytes(byte_tokens("")) == ""
    assert decode_bytes(byte_tokens("é")[:1]) == "\ufffd"  # a cut character is replaced, not an error


def test_decode_bytes_refuses_ids_outside_a_byte():
    with pytest.raises(ms.StitchError, match=r"\[0, 256\), got 300"):
        decode_bytes([104, 300])
    with pytest.raises(ms.StitchError, match=r"drop the ignored labels \(-100\)"):
        decode_bytes(torch.tensor([104, -100]))


def test_token_sequences_rows_and_collated_batches():
    ids = torch.arange(30).view(5, 6) % 7
    mask = torch.ones(5, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    seqs = TokenSequences(ids, mask)
    assert len(seqs) == 5 and seqs.seq_len == 6 and seqs.vocab_size == 7
    row = seqs[1]
    assert sorted(row) == ["attention_mask", "input_ids", "labels"]
    assert all(v.shape == (6,) and v.dtype == torch.int64 for v in row.values())
    assert torch.equal(row["input_ids"], ids[1])
    batches = list(DataLoader(seqs, batch_size=2))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 6), (2, 6), (1, 6)]
    assert all(set(b) == {"input_ids", "attention_mask", "labels"} for b in batches)
    assert all(b[k].shape == b["input_ids"].shape for b in batches for k in b)
    assert torch.equal(torch.cat([b["attention_mask"] for b in batches]), mask)


def test_labels_default_to_the_ids_with_padding_ignored():
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    seqs = TokenSequences(ids, mask)
    assert seqs.labels.tolist() == [[3, 4, 5, 6], [7, 8, -100, -100]]
    assert seqs.attention_mask.dtype == torch.int64
    assert TokenSequences(ids).labels.tolist() == ids.tolist()  # no mask: all ones, labels are the ids
    assert TokenSequences(ids).attention_mask.tolist() == [[1] * 4] * 2
    assert seqs.input_ids.tolist() == ids.tolist()  # the ids themselves are not changed


def test_subset_and_with_labels():
    seqs = TokenSequences(torch.arange(20).view(5, 4), vocab_size=50)
    part = seqs.subset(torch.tensor([4, 1]))
    assert isinstance(part, TokenSequences) and part.vocab_size == 50
    assert part.input_ids.tolist() == [[16, 17, 18, 19], [4, 5, 6, 7]]
    assert len(data.subset(seqs, 2, seed=0)) == 2 and isinstance(data.subset(seqs, 2), TokenSequences)
    labels = torch.full((5, 4), -100)
    labels[:, -1] = 3
    relabelled = seqs.with_labels(labels)
    assert relabelled.labels.tolist() == labels.tolist() and relabelled.input_ids is seqs.input_ids
    with pytest.raises(ms.StitchError, match=r"labels has shape \(5, 3\) but input_ids have shape \(5, 4\)"):
        seqs.with_labels(torch.zeros(5, 3, dtype=torch.int64))
    with pytest.raises(ms.StitchError, match=r"indices must be in \[0, 5\)"):
        seqs.subset([7])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.rand(2, 3)}, r"input_ids must be integer token ids, got torch\.float32 of shape \(2, 3\)"),
        ({"input_ids": torch.tensor([True, False])}, r"input_ids must be integer token ids, got torch\.bool"),
        ({"input_ids": torch.arange(6)}, r"input_ids must be \[N, T\], got shape \(6,\)"),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.int64), "attention_mask": torch.ones(2, 4)},
            r"attention_mask has shape \(2, 4\) but input_ids have shape \(2, 3\)",
        ),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.int64), "attention_mask": torch.tensor([[1, 1, 2], [1, 0, 0]])},
            r"attention_mask \(2, 3\) must hold only 0 \(padding\) and 1 \(real token\), got 2",
        ),
        ({"input_ids": torch.tensor([[1, -2, 3]])}, r"token ids must be >= 0, but input_ids \(1, 3\) hold -2"),
        ({"input_ids": torch.zeros(0, 5, dtype=torch.int64)}, r"input_ids of shape \(0, 5\) hold no tokens"),
        ({"input_ids": torch.zeros(3, 0, dtype=torch.int64)}, r"input_ids of shape \(3, 0\) hold no tokens"),
        ({"input_ids": []}, r"input_ids must be \[N, T\], got shape \(0,\)"),
        (
            {"input_ids": torch.zeros(1, 2, dtype=torch.int64), "labels": torch.tensor([[0, -5]])},
            r"labels \(1, 2\) must be token ids or -100 \(ignored\), got -5",
        ),
        (
            {"input_ids": torch.tensor([[1, 300]]), "vocab_size": 256},
            r"input_ids hold the id 300, outside vocab_size=256",
        ),
        ({"input_ids": torch.tensor([[1, 2]]), "vocab_size": 0}, r"vocab_size must be a positive int"),
    ],
)
def test_token_sequences_refuses_bad_inputs(kwargs, message):
    with pytest.raises(ms.StitchError, match=message):
        TokenSequences(**kwargs)


def test_pack_text_windows_are_slices_of_the_id_stream():
    text = "The quick brown fox jumps over the lazy dog. " * 5  # 225 bytes
    ids = byte_tokens(text)
    seqs = pack_text(text, 16)
    assert len(seqs) == len(ids) // 16 == 14 and seqs.seq_len == 16 and seqs.vocab_size == BYTE_VOCAB
    for i in (0, 5, 13):
        assert torch.equal(seqs.input_ids[i], ids[16 * i : 16 * (i + 1)])
    assert torch.equal(seqs.labels, seqs.input_ids) and bool((seqs.attention_mask == 1).all())
    assert torch.equal(seqs.input_ids.reshape(-1), ids[: 14 * 16])  # the incomplete tail (1 byte) is dropped
    assert decode_bytes(seqs[0]["input_ids"]) == text[:16]
    assert torch.equal(pack_text(ids, 16).input_ids, seqs.input_ids)  # ids in, same sequences out


def test_pack_text_stride_limit_and_tail():
    ids = torch.arange(20)
    overlapping = pack_text(ids, 8, stride=4)
    assert overlapping.input_ids.tolist() == [list(range(s, s + 8)) for s in (0, 4, 8, 12)]
    assert torch.equal(overlapping.input_ids[0, 4:], overlapping.input_ids[1, :4])
    assert pack_text(ids, 8).input_ids.tolist() == [list(range(8)), list(range(8, 16))]  # 16..19 dropped
    assert pack_text(ids, 5, stride=7).input_ids.tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [14, 15, 16, 17, 18]]
    limited = pack_text(ids, 4, limit=2)
    assert limited.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_text(ids, 20).input_ids.tolist() == [list(range(20))]  # exactly one sequence
    assert pack_text(ids, 4).input_ids.data_ptr() != ids.data_ptr()  # a copy, not a view of the caller's ids


def test_pack_text_refuses_short_texts_and_bad_arguments():
    with pytest.raises(ms.StitchError, match=r"the text has 5 tokens, but a sequence of seq_len=8 needs 8"):
        pack_text("hello", 8)
    with pytest.raises(ms.StitchError, match=r"the text has 0 tokens"):
        pack_text("", 2)
    with pytest.raises(ms.StitchError, match=r"seq_len must be an int >= 2 \(a causal model needs a token"):
        pack_text("hello", 1)
    with pytest.raises(ms.StitchError, match=r"stride must be an int >= 1, got 0"):
        pack_text("hello", 2, stride=0)
    with pytest.raises(ms.StitchError, match=r"limit must be an int >= 1, got 0"):
        pack_text("hello", 2, limit=0)
    with pytest.raises(ms.StitchError, match=r"token ids must be one stream \[L\], got shape \(2, 3\)"):
        pack_text(torch.zeros(2, 3, dtype=torch.int64), 2)
    with pytest.raises(ms.StitchError, match=r"the token ids must be integer token ids, got torch\.float32"):
        pack_text(torch.zeros(6), 2)


def test_pack_text_with_a_callable_or_hf_style_tokenizer():
    words = ["one", "two", "three", "four", "five", "six", "seven"]
    vocab = {w: i for i, w in enumerate(words)}
    text = " ".join(words)

    def plain(s: str) -> list[int]:
        return [vocab[w] for w in s.split()]

    class HFStyle:  # an HF tokenizer's shape: called, returns a mapping with "input_ids"; has a length
        def __call__(self, s: str, return_tensors: str | None = None) -> dict:
            ids = plain(s)
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids, "attention_mask": [1]}

        def __len__(self) -> int:
            return 10

    seqs = pack_text(text, 3, tokenizer=plain)
    assert seqs.input_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and seqs.vocab_size == 7  # id 6 is dropped, yet counted
    hf = pack_text(text, 3, tokenizer=HFStyle())
    assert hf.input_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and hf.vocab_size == 10
    pt = pack_text(text, 3, tokenizer=lambda s: HFStyle()(s, return_tensors="pt"))  # [1, L] tensor
    assert pt.input_ids.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ms.StitchError, match=r"keys \['ids'\] but no 'input_ids'"):
        pack_text(text, 3, tokenizer=lambda s: {"ids": [1, 2, 3]})
    with pytest.raises(ms.StitchError, match=r"one sequence of integer ids, got torch\.float32"):
        pack_text(text, 3, tokenizer=lambda s: [0.5, 1.5, 2.5])
    with pytest.raises(ms.StitchError, match=r"a tokenizer applies to a text"):
        pack_text(torch.arange(5), 3, tokenizer=plain)


def test_pydoc_corpus_is_long_english_and_deterministic():
    text = pydoc_corpus()
    assert isinstance(text, str) and len(text) > 400_000
    assert text == pydoc_corpus()
    assert len(text.encode("utf-8")) < 1.01 * len(text)  # English: about one byte a character
    assert " the " in text and 'The "if" statement' in text


def test_text_splits_are_contiguous_blocks_with_the_test_split_at_the_tail():
    positions = torch.arange(1000)  # each token is its own position in the stream
    train, test = text_splits(positions, 32, test_fraction=0.2)
    assert (len(train), len(test)) == (800 // 32, 200 // 32) and train.vocab_size == test.vocab_size == 1000
    assert int(train.input_ids.max()) < 800 <= int(test.input_ids.min())  # no shared token, test is the tail
    assert test.input_ids.tolist() == [list(range(s, s + 32)) for s in range(800, 992, 32)]
    # overlapping windows stay within their block: still no test token in training
    train, test = text_splits(positions, 32, test_fraction=0.2, stride=8)
    assert int(train.input_ids.max()) < 800 <= int(test.input_ids.min())
    assert train.input_ids[1, 0] == 8
    # text in, same blocks as cutting the byte stream
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, test = text_splits(text, 50, test_fraction=0.1)
    stream = byte_tokens(text)
    assert torch.equal(test.input_ids.reshape(-1), stream[900:1000]) and train.vocab_size == test.vocab_size == 256
    assert torch.equal(train.input_ids.reshape(-1), stream[:900])


def test_text_splits_limit_is_seeded_and_refuses_short_blocks():
    positions = torch.arange(2000)
    train, test = text_splits(positions, 10, limit=5, seed=1)
    again, _ = text_splits(positions, 10, limit=5, seed=1)
    other, _ = text_splits(positions, 10, limit=5, seed=2)
    assert len(train) == len(test) == 5 and torch.equal(train.input_ids, again.input_ids)
    assert not torch.equal(train.input_ids, other.input_ids)
    starts = train.input_ids[:, 0]
    assert torch.equal(starts, starts.sort().values) and bool((starts % 10 == 0).all())  # whole windows, text order
    assert int(train.input_ids.max()) < 1800 <= int(test.input_ids.min())
    with pytest.raises(ms.StitchError, match=r"the test block \(last 10% of 100 tokens\) has 10 tokens, .*needs 20"):
        text_splits(torch.arange(100), 20)
    with pytest.raises(ms.StitchError, match=r"test_fraction must be a number in \(0, 1\), got 1\.0"):
        text_splits(torch.arange(100), 20, test_fraction=1.0)


@pytest.mark.slow  # importing transformers takes seconds
def test_pack_text_reads_a_real_hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["one", "two", "three", "four", "five", "six", "seven"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate([*words, "[UNK]"])}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")  # built here, no files
    seqs = pack_text(" ".join(words), 3, tokenizer=tok)  # tok(text) is a BatchEncoding
    assert seqs.input_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and seqs.vocab_size == len(tok) == 8
    pt = pack_text(" ".join(words), 3, tokenizer=lambda s: tok(s, return_tensors="pt"))
    assert torch.equal(pt.input_ids, seqs.input_ids)


@pytest.mark.slow  # importing transformers takes seconds
def test_pydoc_splits_feed_a_tiny_hf_gpt2_through_a_dataloader():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=BYTE_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    train, _ = text_splits(pydoc_corpus(), 64, limit=8)
    padded = train.input_ids.clone()
    mask = torch.ones_like(padded)
    mask[0, 40:] = 0  # one padded row: its labels are ignored there
    seqs = TokenSequences(padded, mask, vocab_size=BYTE_VOCAB)
    batch = next(iter(DataLoader(seqs, batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, 64)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items()})
    assert out.logits.shape == (4, 64, BYTE_VOCAB)
    assert torch.isfinite(out.loss) and 3.0 < float(out.loss) < 8.0  # about ln(256) = 5.5 untrained
