"""A measure that checks itself: self-stitches find the identity, and the pieces the numbers rest on are right."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import modelstitch as ms
from modelstitch import data, zoo
from tests.helpers import same_state, state_snapshot


@pytest.fixture(scope="module")
def digits_net() -> nn.Module:
    """The quick preset's R1111 recipe, shortened: about 0.93 test accuracy on digits."""
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=8)
    recipe = ms.study.PRESETS["quick"].zoo_recipe.replace(epochs=3)
    zoo.train_classifier(net, data.digits(), recipe=recipe, device="cpu", progress=False)
    return net.eval()


@pytest.mark.slow
def test_every_self_stitch_reaches_the_networks_accuracy_with_the_default_recipe(digits_net, tmp_path):
    own = ms.evaluate(digits_net, data.digits(train=False), device="cpu")["accuracy"]
    study = ms.Study(
        {"A": digits_net, "B": zoo.random_control("R1111", seed=1, width=8)},
        train_data=data.digits(),
        test_data=data.digits(train=False),
        out=tmp_path,
        pairs=[("A", "B")],  # no self-pair asked for: the sanity diagonal is added by default
        recipe=ms.study.PRESETS["quick"].recipe,
        device="cpu",
    ).run(progress=False)
    check = study.results.self_stitch()["A"]
    assert check["accuracy"] == pytest.approx(own)
    assert len(check["cells"]) == 5  # every layer of R1111
    assert check["floor"] >= -0.02, check
    assert not check["failed"]
    assert study.matrix("A", "A").shape == (5, 5)
    assert np.isnan(study.matrix("A", "A")[0, 1])  # only the diagonal is trained for the sanity check


@pytest.mark.slow
def test_a_failing_self_stitch_is_flagged_warned_and_outlined(digits_net, tmp_path):
    study = ms.Study(
        {"A": digits_net},
        train_data=data.digits(),
        test_data=data.digits(train=False),
        out=tmp_path,
        pairs=[("A", "A")],
        layers={"A": ["stem", "layer1.0"]},
        recipe=ms.Recipe.paper(lr=0.05, batch_size=64, base_batch_size=64, epochs=1),  # random init, few steps
        device="cpu",
    )
    with pytest.warns(ms.StitchWarning, match="self-stitches failed their sanity check"):
        study.run(progress=False)
    check = study.results.self_stitch()["A"]
    assert check["failed"] and check["floor"] < -0.02
    figure = study.plot()
    outlined = [p for ax in figure.axes for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert outlined  # the failed self-stitch cells are outlined in red
    from modelstitch.analysis import triangle_summary

    assert triangle_summary(study)["self_stitch_floor"]["A"] == pytest.approx(check["floor"])


def test_paper_recipe_is_the_papers_and_the_default_differs_from_it_only_in_the_measured_fields():
    paper = ms.Recipe.paper()
    assert (paper.init, paper.holdout, paper.lr, paper.batch_size, paper.epochs) == ("random", 0.0, 0.01, 256, 4)
    assert (paper.momentum, paper.weight_decay, paper.warmup, paper.base_batch_size) == (0.9, 0.01, 0.1, 256)
    assert (paper.upsampled_epochs_factor, paper.upsampled_lr_factor) == (1.0, 1.0)
    assert paper.upsampled_damping == ms.train.DAMPING  # every stitch alike (and its steps are plain anyway)
    assert (paper.precondition, paper.optim) == (False, "sgd")
    changed = ("lr", "momentum", "batch_size", "base_batch_size", "epochs", "warmup", "upsampled_epochs_factor")
    changed += ("upsampled_lr_factor", "upsampled_damping")
    changed += ("init", "precondition", "holdout")
    assert ms.Recipe().replace(**{name: getattr(paper, name) for name in changed}) == paper
    assert all(getattr(ms.Recipe(), name) != getattr(paper, name) for name in changed)


def test_best_epoch_selection_never_ends_worse_on_the_held_out_data():
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4).eval()
    stitched = ms.stitch(net, "layer2.0", net, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    train = data.subset(data.digits(), 200)
    result = ms.train_stitch(
        stitched, train, recipe=ms.Recipe(epochs=3, batch_size=32, lr=0.5), device="cpu", progress=False
    )
    assert result.selected_epoch in (0, 1, 2, 3)
    assert result.holdout_accuracy is not None


class _Branchy(nn.Module):
    """A layer followed by an `if self.training` branch, as dropout and DropPath are written."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.training:
            h = h * 0
        return self.head(h)


def test_the_graph_cut_is_traced_in_eval_mode_even_for_a_model_in_train_mode():
    model = _Branchy().train()
    rest = ms.suffix(model, "layer")
    assert rest.method == "graph"
    x = torch.randn(3, 4)
    expected = model.head(model.layer(x))  # the eval-mode path
    torch.testing.assert_close(rest(model.layer(x)), expected)
    assert model.training  # the caller's mode is back


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + x  # x is read after the cut at 'a'


def test_a_fallback_to_the_hooked_suffix_is_reported_with_its_reason():
    with pytest.warns(ms.StitchWarning, match=r"hooked full forward.*skip connection across the cut"):
        rest = ms.suffix(_Skip(), "a")
    assert rest.method == "hook"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms.suffix(_Skip(), "a", method="hook")  # asked for: nothing to report


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.act(self.block.conv(x)).mean((2, 3))


def test_prefix_returns_the_layer_output_before_a_later_in_place_op():
    torch.manual_seed(0)
    model, x = _InPlace(), torch.randn(2, 3, 8, 8)
    got = ms.prefix(model, "block.conv")(x)
    torch.testing.assert_close(got, model.block.conv(x))
    assert (got < 0).any()  # not overwritten by the ReLU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_pair_stitches_and_trains(dtype):
    torch.manual_seed(0)
    a, b = (zoo.small_resnet("R1111", width=4).to(dtype).eval() for _ in range(2))
    stitched = ms.stitch(a, "layer2.0", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    assert stitched.stitch.core.weight.dtype == dtype and stitched.provided.dtype == dtype
    before = stitched.stitch.core.weight.detach().clone()
    train = data.subset(data.digits(), 64)
    ms.train_stitch(stitched, train, recipe=ms.Recipe.paper(epochs=1, batch_size=32), device="cpu", progress=False)
    assert not torch.equal(before, stitched.stitch.core.weight)
    assert torch.isfinite(stitched.stitch.core.weight.float()).all()


def test_a_users_own_adamw_loop_changes_the_stitch_and_nothing_else():
    torch.manual_seed(0)
    a, b = zoo.small_resnet("R1111", width=4).eval(), zoo.small_resnet("R1111", width=4).eval()
    snapshots = [state_snapshot(a), state_snapshot(b)]
    stitched = ms.stitch(a, "layer1.0", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    stitch_before = copy.deepcopy(stitched.stitch.state_dict())
    optimizer = torch.optim.AdamW(stitched.parameters(), lr=0.1, weight_decay=0.5)
    x, y = data.digits()[:16]
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(stitched(x), y).backward()
        optimizer.step()
    assert same_state(a, snapshots[0]) and same_state(b, snapshots[1])
    assert any(not torch.equal(v, stitch_before[k]) for k, v in stitched.stitch.state_dict().items())


def test_patience_stops_stalled_stitches_without_changing_the_others():
    """A stitch stopped by `Recipe(patience=1)` followed the same trajectory up to its stop as without patience,
    keeps the epoch of its last improvement, and took fewer steps; the pass ends when every stitch has stopped."""
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4).eval()
    example = torch.randn(2, 3, 32, 32)
    layers = ["stem", "layer1.0", "layer2.0", "layer3.0"]
    train = data.subset(data.digits(), 200)

    def run(patience):
        torch.manual_seed(1)  # the same random stitches both times
        models = [ms.stitch(net, layer, net, layer, example_input=example) for layer in layers]
        # plain steps: whitened ones from the exact start improve at every one of the 8 epochs, and this needs a stall
        recipe = ms.Recipe(epochs=8, batch_size=32, lr=0.5, patience=patience, precondition=False)
        return ms.train.train_stitches(models, train, recipe=recipe, device="cpu", progress=False, cache=True)

    full, stopped = run(None), run(1)
    steps_per_epoch = full[0].steps // 8
    assert any(len(r.epoch_losses) < 8 for r in stopped)  # some stitch stalled
    for alone, early in zip(full, stopped):
        trained = len(early.epoch_losses)
        np.testing.assert_allclose(early.epoch_losses, alone.epoch_losses[:trained], rtol=1e-5)
        assert early.steps == min(full[0].steps, trained * steps_per_epoch)
        if trained < 8:
            assert early.selected_epoch == trained - 1  # its last improvement, one epoch (the patience) before
        assert early.holdout_accuracy is not None


def test_min_delta_stops_stitches_whose_accuracy_rises_too_little():
    """With `Recipe(min_delta=0.99)` no rise can count (chance is 0.1), so every stitch stops after `patience` epochs,
    still keeping its best state; with the default any better score counts and the same stitches train longer."""
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4).eval()
    example = torch.randn(2, 3, 32, 32)
    train = data.subset(data.digits(), 200)

    def run(**patience):
        torch.manual_seed(1)
        models = [ms.stitch(net, layer, net, layer, example_input=example) for layer in ("stem", "layer2.0")]
        recipe = ms.Recipe(epochs=6, batch_size=32, lr=0.05, **patience)
        return ms.train.train_stitches(models, train, recipe=recipe, device="cpu", progress=False, cache=True)

    counted_any, counted_none = run(patience=2), run(patience=2, min_delta=0.99)
    assert [len(r.epoch_losses) for r in counted_none] == [2, 2]
    assert sum(len(r.epoch_losses) for r in counted_any) > 4  # measured: 6 and 6
    for r in counted_none:
        assert r.selected_epoch in (0, 1, 2) and r.holdout_accuracy is not None
    with pytest.raises(ms.StitchError, match="min_delta only applies with patience"):
        ms.Recipe(min_delta=0.01)
    with pytest.raises(ms.StitchError, match="min_delta"):
        ms.Recipe(patience=1, min_delta=-0.1)


def test_patience_without_held_out_data_warns():
    torch.manual_seed(0)
    net = zoo.small_resnet("R1111", width=4).eval()
    stitched = ms.stitch(net, "layer2.0", net, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    with pytest.warns(ms.StitchWarning, match="patience=2"):
        ms.train_stitch(
            stitched, data.subset(data.digits(), 64), recipe=ms.Recipe(epochs=1, batch_size=32, holdout=0, patience=2),
            device="cpu", progress=False,
        )  # fmt: skip
    with pytest.raises(ms.StitchError, match="patience"):
        ms.Recipe(patience=0)


@pytest.mark.slow
def test_patience_stops_a_settled_stitch_and_patience_4_trains_it_all_epochs(digits_net):
    """A self-stitch starts at its exact least-squares solution, so no epoch raises its held-out accuracy by a
    point: ``patience=1, min_delta=0.01`` stops it after one epoch, its held-out accuracy within a point of the
    full run's; ``--patience 4`` (`PresetOptions(patience=4)`) on a 4-epoch recipe trains it all 4 epochs."""
    from modelstitch.study import PRESETS, PresetOptions
    from modelstitch.study._presets import _stitch_recipe

    quick = PRESETS["quick"]
    settled = quick.recipe.replace(epochs=4, patience=1, min_delta=0.01)
    full = _stitch_recipe(PresetOptions(epochs=4, patience=4, min_delta=0.01), quick)
    assert (full.epochs, full.patience, full.min_delta, full.lr) == (4, 4, 0.01, quick.recipe.lr)

    def run(recipe):
        stitched = ms.stitch(digits_net, "layer2.0", digits_net, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
        return ms.train_stitch(stitched, data.digits(), recipe=recipe, device="cpu", progress=False)

    early, every = run(settled), run(full)
    assert len(every.epoch_losses) == 4 and every.steps % 4 == 0
    assert len(early.epoch_losses) == 1 and early.steps == every.steps // 4
    assert early.holdout_accuracy >= every.holdout_accuracy - 0.01  # the epochs it skipped added under a point


def test_paper_recipe_option_keeps_the_presets_paper_recipe():
    """``--paper-recipe`` is the paper's recipe at the preset's learning rate and batch (not the default's)."""
    from modelstitch.study import PRESETS, PresetOptions
    from modelstitch.study._presets import _stitch_recipe

    quick = _stitch_recipe(PresetOptions(paper_recipe=True, seed=3), PRESETS["quick"])
    assert quick == ms.Recipe.paper(lr=0.01, batch_size=64, base_batch_size=64, seed=3)
    lm = _stitch_recipe(PresetOptions(paper_recipe=True), PRESETS["lm-quick"])
    assert (lm.lr, lm.batch_size, lm.epochs, lm.init, lm.holdout, lm.momentum) == (0.01, 32, 1, "random", 0.0, 0.9)
    assert _stitch_recipe(PresetOptions(paper_recipe=True), PRESETS["paper"]) == ms.Recipe.paper()
