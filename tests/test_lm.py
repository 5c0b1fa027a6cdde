"""Language models as senders and receivers: HuggingFace transformers built from configs (nothing downloaded)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelstitch as ms
from tests.helpers import no_hooks_left, same_state, state_snapshot

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64


def _gpt2(seed: int = 0, layers: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=layers, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _bert(seed: int = 0, head: str = "mlm") -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = (
        transformers.BertForMaskedLM(config) if head == "mlm" else transformers.BertForSequenceClassification(config)
    )
    return model.eval()


def _tokens(n: int = 8, length: int = 12, seed: int = 0, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # right padding of a few sequences, as a tokenizer's batch gives
        mask[1 % n, -3:] = 0
        mask[4 % n, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


BLOCKS = {
    "gpt2": (_gpt2, "transformer.h.2"),
    "llama": (_llama, "model.layers.2"),
    "bert": (_bert, "bert.encoder.layer.2"),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_receiver_starts_at_its_layer_and_equals_the_full_forward(name):
    """The skip suffix runs no block before the layer, and gives what the hooked full forward gives."""
    factory, layer = BLOCKS[name]
    model = factory()
    x = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ms.StitchWarning)  # no fallback to the hooked forward
        rest = ms.suffix(model, layer, example_input=x)
    assert rest.method == "skip"
    rep = ms.activations(model, x, [layer])[layer]
    new = rep + 0.1 * torch.randn_like(rep)
    hooked = ms.suffix(model, layer, method="hook")
    blocks = model.get_submodule(layer.rpartition(".")[0])
    calls = [0] * len(blocks)  # calls of the modules inside each block: what actually ran

    def counter(i: int):
        return lambda m, a: calls.__setitem__(i, calls[i] + 1)

    handles = [m.register_forward_pre_hook(counter(i)) for i, b in enumerate(blocks) for m in b.modules() if m is not b]
    with torch.no_grad():
        got = rest(new, x).logits
        calls_skip = list(calls)
        want = hooked(new, x).logits
    for h in handles:
        h.remove()
    index = int(layer.rpartition(".")[2])
    assert calls_skip[: index + 1] == [0] * (index + 1)  # not executed: neither the blocks before nor the layer
    assert all(c > 0 for c in calls_skip[index + 1 :])  # the blocks after it run
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert no_hooks_left(model)
    assert "forward" not in blocks[0].__dict__  # the patched forwards are gone


def test_the_skip_suffix_is_refused_where_it_cannot_hold():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ms.StitchError, match=r"cannot skip Sequential's blocks up to '0'.*not one of a nn.ModuleList"):
        ms.suffix(net, "0", example_input=torch.randn(2, 4), method="skip")


def test_causal_task_loss_is_hf_next_token_loss_with_padding_left_out():
    model = _gpt2()
    x = _tokens()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    with torch.no_grad():
        hf = model(**x, labels=labels).loss.item()
    data = [x]  # one HF-style batch, no labels: a causal LM takes its next tokens from input_ids
    result = ms.evaluate(model, data, device="cpu")
    assert result["loss"] == pytest.approx(hf, rel=1e-5)
    with torch.no_grad():
        logits = model(**x).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == target)[keep].double().mean()), abs=1e-9)


@pytest.mark.parametrize("cache", [False, True])
def test_stitching_two_gpt2s_trains_on_token_batches_without_labels(cache):
    a, b = _gpt2(0), _gpt2(1)
    before = state_snapshot(a), state_snapshot(b)
    x = _tokens(n=16)
    stitched = ms.stitch(a, "transformer.h.1", b, "transformer.h.2", example_input=_tokens(n=2))
    assert stitched.receiver_suffix.method == "skip"
    batches = [{k: v[i : i + 4] for k, v in x.items()} for i in range(0, 16, 4)]
    recipe = ms.Recipe(epochs=3, batch_size=4, holdout=0, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)  # few steps
        result = ms.train_stitch(stitched, batches, recipe=recipe, device="cpu", progress=False, cache=cache)
    assert stitched.init == "lstsq"
    assert math.isfinite(result.final_loss) and result.epoch_losses[-1] < result.epoch_losses[0]
    assert ms.evaluate(stitched, batches, device="cpu")["loss"] == pytest.approx(result.final_loss, rel=0.05)
    assert same_state(a, before[0]) and same_state(b, before[1])


def test_kl_objective_trains_to_the_receivers_own_distribution():
    model = _gpt2()
    x = _tokens(n=16)
    batches = [{k: v[i : i + 4] for k, v in x.items()} for i in range(0, 16, 4)]
    stitched = ms.stitch(
        model, "transformer.h.1", model, "transformer.h.1", example_input=_tokens(n=2), init="identity"
    )
    recipe = ms.Recipe(epochs=1, batch_size=4, holdout=0, lr=1e-12, warmup=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)
        identity = ms.train_stitch(stitched, batches, objective="kl", recipe=recipe, device="cpu", progress=False)
    assert identity.epoch_losses[0] == pytest.approx(0.0, abs=1e-6)  # the identity reproduces the receiver exactly
    torch.manual_seed(0)  # a receiver with peaked outputs (a random GPT-2's are near uniform): a classifier
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        net[-1].weight.mul_(10)
    inputs = torch.randn(64, 6)
    random = ms.stitch(net, "1", net, "1", example_input=inputs[:2], init="random")
    unlabelled = torch.utils.data.TensorDataset(inputs)  # inputs only: no labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)
        result = ms.train_stitch(
            random,
            unlabelled,
            objective="kl",
            recipe=recipe.replace(epochs=30, lr=0.1, batch_size=16),
            device="cpu",
            progress=False,
        )
    assert result.epoch_losses[-1] < 0.25 * result.epoch_losses[0]


def test_kl_to_by_hand():
    reference, output = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, log_p, log_q = reference.softmax(-1), reference.log_softmax(-1), output.log_softmax(-1)
    per = (p * (log_p - log_q)).sum(-1)
    want = (per[0, 0] + per[0, 1] + per[1, 0]) / 3
    assert float(ms.train.kl_to(reference, output, mask)) == pytest.approx(float(want), rel=1e-6)
    assert float(ms.train.kl_to(reference[:, 0], output[:, 0])) == pytest.approx(float(per[:, 0].mean()), rel=1e-6)


def test_a_bert_classifier_takes_dict_inputs_with_labels():
    """A list of ({"input_ids", "attention_mask"}, labels) batches used to fail with a raw ValueError."""
    a, b = _bert(0, head="cls"), _bert(1, head="cls")
    x = _tokens(n=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batches = [({k: v[:4] for k, v in x.items()}, labels[:4]), ({k: v[4:] for k, v in x.items()}, labels[4:])]
    with torch.no_grad():
        want = F.cross_entropy(b(**x).logits, labels).item()
    assert ms.evaluate(b, batches, device="cpu")["loss"] == pytest.approx(want, rel=1e-5)
    stitched = ms.stitch(a, "bert.encoder.layer.1", b, "bert.encoder.layer.1", example_input=_tokens(n=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)
        result = ms.train_stitch(
            stitched, batches, recipe=ms.Recipe(epochs=2, batch_size=4, holdout=0), device="cpu", progress=False
        )
    assert math.isfinite(result.final_loss)
    assert 0 <= ms.evaluate(stitched, batches, device="cpu")["accuracy"] <= 1


def test_task_on_unlabelled_data_for_a_classifier_is_refused():
    b = _bert(0, head="cls")
    stitched = ms.stitch(b, "bert.encoder.layer.1", b, "bert.encoder.layer.1", example_input=_tokens(n=2))
    with pytest.raises(ms.StitchError, match=r"the 'task' objective needs labels.*objective='kl'"):
        ms.train_stitch(
            stitched, [_tokens(n=4)], recipe=ms.Recipe(epochs=1, batch_size=4, holdout=0), device="cpu", progress=False
        )


def test_a_causal_lm_needs_two_tokens_to_predict():
    model = _gpt2()
    with pytest.raises(ms.StitchError, match=r"sequences need at least 2 tokens"):
        ms.evaluate(model, [_tokens(n=4, length=1, padded=False)], device="cpu")


def _hand_scores(m: ms.StitchedModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every score of one tensor batch, straight from the definitions (one batch: no streaming)."""
    with torch.no_grad():
        provided = m.provided_representation(x)
        expected = m.expected_representation(x)
        s = m.stitch(provided)
        stitched, own = m.receiver_suffix(s), m.receiver(x)
        zero = m.receiver_suffix(torch.zeros_like(expected))
        mean = m.receiver_suffix(expected.mean(0, keepdim=True).expand_as(expected))
    loss = {k: F.cross_entropy(v, y).item() for k, v in [("s", stitched), ("b", own), ("z", zero), ("m", mean)]}
    p, log_p, log_q = own.softmax(-1), own.log_softmax(-1), stitched.log_softmax(-1)
    return {
        "accuracy": (stitched.argmax(1) == y).double().mean().item(),
        "loss": loss["s"],
        "receiver_accuracy": (own.argmax(1) == y).double().mean().item(),
        "receiver_loss": loss["b"],
        "zero_ablation_loss": loss["z"],
        "mean_ablation_loss": loss["m"],
        "loss_recovered_zero": (loss["z"] - loss["s"]) / (loss["z"] - loss["b"]),
        "loss_recovered_mean": (loss["m"] - loss["s"]) / (loss["m"] - loss["b"]),
        "kl": (p * (log_p - log_q)).sum(-1).mean().item(),
        "agreement": (stitched.argmax(1) == own.argmax(1)).double().mean().item(),
        "fvu": ((s - expected).square().sum() / (expected - expected.mean(0)).square().sum()).item(),
    }


def test_every_score_matches_its_definition_by_hand():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    stitched = ms.stitch(a, "1", b, "3", example_input=x[:2], init="random")
    (got,) = ms.train.score_stitches([stitched], [(x, y)], device="cpu")
    want = _hand_scores(stitched, x, y)
    assert set(got) == set(ms.train.SCORES) == set(want)
    rel = {"loss_recovered_zero": 1e-4, "loss_recovered_mean": 1e-4}  # ratios of small float32 differences
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel.get(key, 1e-5), abs=1e-7), key
    in_batches = ms.train.score_stitches([stitched], [(x[:16], y[:16]), (x[16:], y[16:])], device="cpu")[0]
    for key in want:  # streamed over batches: the same numbers
        assert in_batches[key] == pytest.approx(want[key], rel=rel.get(key, 1e-5), abs=1e-7), key


def test_an_identity_self_stitch_recovers_all_the_loss_of_an_lm():
    model = _gpt2()
    x = _tokens(n=8)
    stitched = ms.stitch(
        model, "transformer.h.1", model, "transformer.h.1", example_input=_tokens(n=2), init="identity"
    )
    (scores,) = ms.train.score_stitches([stitched], [x], device="cpu")
    assert scores["loss"] == pytest.approx(scores["receiver_loss"], rel=1e-5)
    assert scores["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert scores["kl"] == pytest.approx(0.0, abs=1e-6) and scores["agreement"] == 1.0
    assert scores["fvu"] == pytest.approx(0.0, abs=1e-8)


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge solution ``[D_out, D_in]`` for rows ``x`` ``[R, D_in]``, ``y`` ``[R, D_out]``, with a free bias."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    a = x.T @ x
    d = a.shape[0] - 1
    a[range(d), range(d)] += ridge * a.diagonal()[:d].mean()
    return torch.linalg.solve(a, x.T @ y.double())[:d].T


def test_padding_and_skipped_positions_stay_out_of_least_squares():
    """The fit on a padded batch equals the ridge fit of the unpadded rows alone: padding never enters it."""
    a, b = _gpt2(0), _gpt2(1)
    x = _tokens(n=8)
    layer = "transformer.h.1"
    with torch.no_grad():
        provided = ms.activations(a, x, [layer])[layer]
        expected = ms.activations(b, x, [layer])[layer]
    keep = x["attention_mask"].bool()
    for positions in (None, ms.core.Positions(skip_first=1)):
        if positions is not None:
            keep[:, 0] = False
        stitched = ms.stitch(a, layer, b, layer, example_input=_tokens(n=2), init="random")
        ms.stitches.fit_least_squares_all([stitched], [x], device="cpu", ridge=1e-3, positions=positions)
        want = _ridge_fit(provided[keep], expected[keep], 1e-3)
        torch.testing.assert_close(stitched.stitch.linear.weight.double(), want, rtol=1e-4, atol=1e-5)


def test_position_mask_rules():
    reps = torch.ones(2, 5, 3)
    reps[0, 2] = 100.0  # an outlier position
    mask = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    got = ms.core.position_mask(mask, [reps], ms.core.Positions(skip_first=1, max_norm_ratio=10))
    assert got.tolist() == [[False, True, False, True, False], [False, True, True, True, True]]
    assert ms.core.position_mask({"input_ids": torch.zeros(2, 5)}, [reps]) is None  # nothing to leave out
    assert ms.core.position_mask(mask, [torch.ones(2, 3, 4, 4)]) is None  # a map: no positions
    with pytest.raises(ms.StitchError, match=r"attention_mask has shape \(2, 4\), but the representations"):
        ms.core.position_mask({"attention_mask": torch.ones(2, 4)}, [reps])
    with pytest.raises(ms.StitchError, match=r"skip_first must be an int >= 0"):
        ms.core.Positions(skip_first=-1)


def test_the_mse_objective_leaves_padding_out():
    a = _gpt2(0)
    x = _tokens(n=4)
    layer = "transformer.h.1"
    stitched = ms.stitch(a, layer, a, layer, example_input=_tokens(n=2), init="random")
    with torch.no_grad():
        rep = ms.activations(a, x, [layer])[layer]
        squared = (stitched.stitch(rep) - rep).square().mean(-1)
    want = squared[x["attention_mask"].bool()].mean().item()
    recipe = ms.Recipe(epochs=1, batch_size=4, holdout=0, lr=1e-12, warmup=0.0, init="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.StitchWarning)
        result = ms.train_stitch(stitched, [x], objective="mse", recipe=recipe, device="cpu", progress=False)
    assert result.epoch_losses[0] == pytest.approx(want, rel=1e-5)


def test_token_ids_the_receiver_cannot_embed_are_refused():
    a, small = _gpt2(0), _gpt2(1)
    small.resize_token_embeddings(32)  # a receiver with a smaller vocabulary
    with pytest.raises(ms.StitchError, match=r"GPT2LMHeadModel embeds token ids 0..31, but the input_ids range"):
        ms.stitch(a, "transformer.h.1", small, "transformer.h.1", example_input=_tokens(n=2))


def test_a_masked_lm_scores_what_its_head_predicts():
    """No shift for a masked LM: its logits at a position predict that position's label; -100 elsewhere."""
    model = _bert(0)
    x = _tokens(n=6)
    labels = torch.full_like(x["input_ids"], -100)
    labels[:, 3] = x["input_ids"][:, 3]
    labels[:, 7] = x["input_ids"][:, 7]
    with torch.no_grad():  # padding is never scored, whatever the labels say there
        hf = model(**x, labels=labels.masked_fill(x["attention_mask"] == 0, -100)).loss.item()
    assert not ms.train.task_of(model).causal
    assert ms.evaluate(model, [(x, labels)], device="cpu")["loss"] == pytest.approx(hf, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_dict_example_input_follows_the_networks_to_cuda():
    # stitch() and a Study once moved only a tensor example_input: a HuggingFace batch stayed on the CPU and the
    # CUDA network's embedding failed on it
    a, b = (ms.zoo.tiny_gpt2(2, width=16, seq_len=16, seed=s).cuda() for s in (0, 1))
    x = {"input_ids": torch.randint(0, 200, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    stitched = ms.stitch(a, "transformer.h.0", b, "transformer.h.1", example_input=x)
    assert next(stitched.stitch.parameters()).is_cuda
