"""Preconditioned stitch training: `Recipe(precondition=True)`, `train.Preconditioner`, the moments of least squares.

Real tiny stitches and networks on real digits, on the CPU; nothing is mocked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import modelstitch as ms
from modelstitch import data, zoo
from modelstitch.stitches import LeastSquares, make_stitch
from modelstitch.train import Preconditioner

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step(stitch: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, precondition: bool) -> None:
    """One plain SGD step (lr 0.1) on the MSE to ``target``, preconditioned or not."""
    stitch.zero_grad()
    F.mse_loss(stitch(x), target).backward()
    if precondition:
        Preconditioner([stitch], CPU)()
    with torch.no_grad():
        for p in stitch.parameters():
            p -= 0.1 * p.grad


def _moments(stitch: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    fit = LeastSquares(stitch)
    fit.update(x, target)
    fit.record_moments()


@pytest.mark.parametrize("shapes", [((6,), (4,)), ((6, 4, 4), (4, 4, 4)), ((6, 8, 8), (4, 4, 4))])
def test_a_preconditioned_step_does_not_depend_on_how_the_sender_scales_its_channels(shapes):
    provided, expected = shapes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, *provided, generator=g)
    target = torch.randn(128, *expected, generator=g)
    scale = torch.tensor([0.5, 0.7, 1.0, 1.3, 1.6, 2.0])  # one factor per input channel
    scale_x = scale.reshape(-1, *[1] * (len(provided) - 1))
    torch.manual_seed(0)
    plain = make_stitch(provided, expected)
    # the same function of the scaled input: weights divided by the channel's factor
    scaled = copy.deepcopy(plain)
    with torch.no_grad():
        w = scaled.linear.weight
        w /= scale.reshape(1, -1, *[1] * (w.dim() - 2))
    assert torch.allclose(plain(x), scaled(x * scale_x), atol=1e-5)
    gaps = {}
    for precondition in (True, False):
        a, b = copy.deepcopy(plain), copy.deepcopy(scaled)
        _moments(a, x, target)
        _moments(b, x * scale_x, target)
        _one_step(a, x, target, precondition)
        _one_step(b, x * scale_x, target, precondition)
        gaps[precondition] = (a(x) - b(x * scale_x)).abs().max().item()
    # whitened steps agree up to the damping; plain SGD steps move the scaled channels by their factor squared
    assert gaps[True] < 2e-3
    assert gaps[False] > 10 * gaps[True]


def test_a_preconditioned_step_solves_least_squares_in_one_step():
    """On the MSE, a step of 1/2 from zero is the Newton step: the least-squares map, up to the damping."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 5, generator=g) * torch.tensor([0.3, 1.0, 3.0, 1.0, 0.5]) + 1.0
    target = x @ torch.randn(5, 3, generator=g) + 0.25
    residuals = {}
    for precondition in (True, False):
        stitch = make_stitch((5,), (3,))
        with torch.no_grad():
            stitch.linear.weight.zero_()
            stitch.linear.bias.zero_()
        _moments(stitch, x, target)
        stitch.zero_grad()
        F.mse_loss(stitch(x), target, reduction="sum").div(len(x)).backward()  # the gradient 2 (W x̃ - y) x̃ᵀ / n
        if precondition:
            Preconditioner([stitch], CPU)()
        with torch.no_grad():
            for p in stitch.parameters():
                p -= 0.5 * p.grad
        residuals[precondition] = ((stitch(x) - target).norm() / target.norm()).item()
    assert residuals[True] < 0.01  # the damping (1e-3 of the mean diagonal) keeps it from 0
    assert residuals[False] > 1.0  # the plain step overshoots along the channel of scale 3


def test_least_squares_records_the_second_moments_of_the_cores_input_rows():
    sender = zoo.small_resnet("R1111", width=4).eval()  # eval: batch norm from running statistics, as stitching runs it
    receiver = zoo.small_resnet("R1211", width=4).eval()
    digits = Subset(data.digits(), range(96))
    x = torch.stack([digits[i][0] for i in range(len(digits))])
    torch.manual_seed(0)
    stitched = ms.stitch(sender, "layer3.0", receiver, "layer2.0", example_input=x[:2], init="random")
    assert stitched.stitch.input_moments is None
    ms.fit_least_squares(stitched, digits, device=CPU)
    # by hand: the sender's layer3.0 output [96, 16, 4, 4], one row per pixel, a column of ones for the bias
    (provided,) = ms.activations(sender, x, ["layer3.0"]).values()
    rows = provided.permute(0, 2, 3, 1).reshape(-1, provided.shape[1])
    rows = torch.cat([rows, torch.ones(len(rows), 1)], dim=1).double()
    assert torch.allclose(stitched.stitch.input_moments.double(), rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
    assert "input_moments" not in str(list(stitched.stitch.state_dict()))


@pytest.mark.filterwarnings("ignore:.*optimiser steps")
def test_only_stitches_that_started_from_least_squares_take_whitened_steps():
    sender = zoo.small_resnet("R1111", width=4)
    receiver = zoo.small_resnet("R1211", width=4)
    digits = Subset(data.digits(), range(128))
    example = torch.stack([digits[i][0] for i in range(2)])

    def trained(init: str, precondition: bool) -> torch.Tensor:
        torch.manual_seed(0)
        stitched = ms.stitch(sender, "layer3.0", receiver, "layer1.0", example_input=example)
        recipe = ms.Recipe(init=init, holdout=0, epochs=1, batch_size=32, precondition=precondition)
        ms.train_stitch(stitched, digits, recipe=recipe, device=CPU, progress=False)
        assert (stitched.stitch.input_moments is not None) == (init == "lstsq")
        return stitched.stitch.linear.weight.detach().clone()

    assert not torch.equal(trained("lstsq", True), trained("lstsq", False))
    # a random start has no least-squares moments: the same plain steps either way
    assert torch.equal(trained("random", True), trained("random", False))


def test_moments_of_another_stitch_are_refused():
    s = make_stitch((6,), (4,))
    s.input_moments = torch.eye(3)
    with pytest.raises(ms.StitchError, match=r"input moments of shape \(3, 3\), not \(7, 7\)"):
        Preconditioner([s], CPU)


def test_the_paper_recipe_takes_plain_steps_and_the_flag_is_checked():
    assert ms.Recipe().precondition is True
    assert ms.Recipe.paper().precondition is False
    assert "precondition=False" in repr(ms.Recipe.paper())
    with pytest.raises(ms.StitchError, match="precondition must be True or False, got 'yes'"):
        ms.Recipe(precondition="yes")


@pytest.mark.parametrize(
    ("init", "precondition", "steps", "warns"),
    [
        ("lstsq", True, ms.train.MIN_WHITENED_STEPS, False),  # whitened steps: 38 are enough
        ("lstsq", True, ms.train.MIN_WHITENED_STEPS - 1, True),
        ("lstsq", False, ms.train.MIN_WHITENED_STEPS, True),  # the same 38 plain steps are too few
        ("random", True, ms.train.MIN_WHITENED_STEPS, True),  # a random start takes plain steps
        ("random", True, ms.train.MIN_STEPS, False),
    ],
)
def test_the_too_few_steps_warning_counts_whitened_and_plain_steps_apart(init, precondition, steps, warns):
    sender = zoo.small_resnet("R1111", width=4).eval()
    receiver = zoo.small_resnet("R1211", width=4).eval()
    digits = Subset(data.digits(image_size=8), range(128))  # 32 steps per epoch at batch 4
    stitched = ms.stitch(sender, "layer3.0", receiver, "layer3.0", example_input=digits[0][0][None])
    recipe = ms.Recipe(init=init, precondition=precondition, holdout=0, batch_size=4, epochs=steps / 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ms.train_stitch(stitched, digits, recipe=recipe, device=CPU, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, ms.StitchWarning)]
    assert any(f"only {steps} optimiser steps" in m for m in messages) == warns, messages
    if warns:
        kind = "whitened" if (init, precondition) == ("lstsq", True) else "plain"
        floor = ms.train.MIN_WHITENED_STEPS if kind == "whitened" else ms.train.MIN_STEPS
        assert any(f"below {floor} {kind} steps" in m for m in messages), messages


@pytest.mark.parametrize("damping", [1e-3, 0.3, 10.0])
def test_a_damped_step_is_the_gradient_times_the_inverse_of_the_damped_moments(damping):
    """By hand: ``G (M + δ mean(diag M) I)⁻¹`` for the gradient ``G = [∂W | ∂b]`` of a 1x1 convolution stitch."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 6, 4, 4, generator=g) * torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0, 0.2])[:, None, None]
    target = torch.randn(64, 4, 4, 4, generator=g)
    stitch = make_stitch((6, 4, 4), (4, 4, 4))
    _moments(stitch, x, target)
    F.mse_loss(stitch(x), target).backward()
    w, b = stitch.linear.weight, stitch.linear.bias
    grad = torch.cat([w.grad.reshape(4, 6), b.grad[:, None]], dim=1).double()
    m = stitch.input_moments.double()
    expected = grad @ torch.linalg.inv(m + damping * m.diagonal().mean() * torch.eye(7, dtype=torch.float64))
    Preconditioner([stitch], CPU, damping=[damping])()
    assert torch.allclose(w.grad.reshape(4, 6).double(), expected[:, :6], rtol=1e-4, atol=1e-6)
    assert torch.allclose(b.grad.double(), expected[:, 6], rtol=1e-4, atol=1e-6)


def test_one_damping_per_stitch_or_none():
    s = make_stitch((6,), (4,))
    with pytest.raises(ValueError, match="2 dampings for 1 stitches"):
        Preconditioner([s], CPU, damping=[0.1, 0.2])
    with pytest.raises(ms.StitchError, match=r"upsampled_damping must be a finite number >= 0, got -0\.1"):
        ms.Recipe(upsampled_damping=-0.1)


@pytest.mark.filterwarnings("ignore:.*optimiser steps")
def test_only_stitches_that_upsample_by_4_take_the_upsampled_damping():
    """R1111 ``layer3.0`` (8x8) -> R1211 ``layer1.0`` (32x32) upsamples by 4: `Recipe.upsampled_damping` changes its
    training; ``layer2.0`` -> ``layer2.0`` (no upsampling), trained in the same pass, ends bit for bit the same."""
    sender = zoo.small_resnet("R1111", width=4).eval()
    receiver = zoo.small_resnet("R1211", width=4).eval()
    digits = Subset(data.digits(), range(256))
    example = torch.stack([digits[i][0] for i in range(2)])

    def trained(upsampled_damping: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        models = [
            ms.stitch(sender, a, receiver, b, example_input=example)
            for a, b in [("layer3.0", "layer1.0"), ("layer2.0", "layer2.0")]
        ]
        assert [m.stitch.upsample for m in models] == [4, 1]
        recipe = ms.Recipe(holdout=0, batch_size=32, upsampled_damping=upsampled_damping)
        ms.train_stitches(models, digits, recipe=recipe, device=CPU, progress=False)
        return [m.stitch.linear.weight.detach().clone() for m in models]

    default, undamped = trained(ms.Recipe().upsampled_damping), trained(ms.train.DAMPING)
    assert not torch.allclose(default[0], undamped[0], atol=1e-4)
    assert torch.equal(default[1], undamped[1])
