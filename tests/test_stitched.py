from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import modelstitch as ms
from tests.helpers import SkipNet, no_hooks_left, same_state, state_snapshot


def resnets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize(
    ("factory", "shape", "layer"),
    [
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), "layer2.0"),
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), "layer2.0.conv1"),  # hook suffix
        (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), (1, 3, 224, 224), "blocks.5"),
        (SkipNet, (2, 3, 8, 8), "body"),
        (SkipNet, (2, 3, 8, 8), "input"),
    ],
)
def test_identity_self_stitch_reproduces_the_model(factory, shape, layer):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape)
    stitched = ms.stitch(model, layer, model, layer, example_input=x, init="identity")
    with torch.no_grad():
        torch.testing.assert_close(stitched(x), model(x), rtol=1e-4, atol=1e-4)
    assert no_hooks_left(model)


def test_issue_snippet_resnet_and_vit():
    a, b = resnets()
    x = torch.randn(4, 3, 32, 32)
    stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    assert stitched(x).shape == (4, 10)
    assert stitched.provided.shape == (256, 2, 2) and stitched.expected.shape == (128, 4, 4)
    assert {n for n, p in stitched.named_parameters() if p.requires_grad} >= {"stitch.core.weight"}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    into_resnet = ms.stitch(vit, "blocks.5", b, "layer3.0", example_input=torch.randn(1, 3, 224, 224))
    assert into_resnet.provided.shape == (197, 192) and into_resnet.expected.shape == (256, 14, 14)
    assert into_resnet(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_only_the_stitch_gets_gradients_and_nothing_else_changes():
    a, b = resnets()
    a.train()
    b.layer1.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in [*a.named_parameters(), *b.named_parameters()]}
    snap_a, snap_b = state_snapshot(a), state_snapshot(b)
    stitched = ms.stitch(a, "layer2.1", b, "layer2.1", example_input=torch.randn(2, 3, 32, 32)).train()
    opt = torch.optim.SGD(stitched.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(stitched(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
        loss.backward()
        opt.step()
    assert same_state(a, snap_a) and same_state(b, snap_b)  # BatchNorm running stats included
    assert all(p.grad is None for p in [*a.parameters(), *b.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stitched.stitch.parameters())
    assert all(m.training for m in [*a.modules(), *b.modules()])  # the caller's modes are back
    assert {n: p.requires_grad for n, p in [*a.named_parameters(), *b.named_parameters()]} == flags
    assert stitched.stitch.training


def test_modes_and_flags_restored_when_the_forward_raises():
    a, b = resnets()
    a.train()
    stitched = ms.stitch(a, "layer1.0", b, "layer1.0", example_input=torch.randn(2, 3, 32, 32))
    with pytest.raises(ms.StitchError, match=r"cell ResNet\['layer1.0'\] -> ResNet\['layer1.0'\].*5 channels"):
        stitched(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert all(m.training for m in a.modules())
    assert all(p.requires_grad for p in [*a.parameters(), *b.parameters()])
    assert no_hooks_left(a) and no_hooks_left(b)


def test_stitch_errors_name_the_problem():
    a, b = resnets()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ms.StitchError, match="example_input"):
        ms.stitch(a, "layer1.0", b, "layer1.0", example_input=None)
    with pytest.raises(ms.StitchError, match=r"sender.*runs 2 times"):
        ms.stitch(a, "layer1.0.relu", b, "layer1.0", example_input=x)
    with pytest.raises(ms.StitchError, match="no layer 'layer9'"):
        ms.stitch(a, "layer1.0", b, "layer9", example_input=x)


def test_stitch_into_input_generates_an_input_shaped_tensor():
    a, b = resnets()
    stitched = ms.stitch(a, "layer2.0", b, "input", example_input=torch.randn(2, 3, 32, 32))
    assert stitched.expected.shape == (3, 32, 32)
    generated = stitched.stitch(stitched.provided_representation(torch.randn(2, 3, 32, 32)))
    assert generated.shape == (2, 3, 32, 32)


def test_representations_and_forward_from_agree():
    a, b = resnets()
    x = torch.randn(3, 3, 32, 32)
    stitched = ms.stitch(a, "layer2.0", b, "layer3.0", example_input=x)
    provided = stitched.provided_representation(x)
    assert torch.equal(provided, ms.activations(a.eval(), x, ["layer2.0"])["layer2.0"])
    assert torch.equal(stitched.expected_representation(x), ms.activations(b.eval(), x, ["layer3.0"])["layer3.0"])
    with torch.no_grad():
        torch.testing.assert_close(stitched.forward_from(provided), stitched(x))


def test_stitched_model_moves_with_to():
    a, b = resnets()
    stitched = ms.stitch(a, "layer2.0", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32)).double()
    assert stitched(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snippet_on_cuda():
    a, b = (m.cuda() for m in resnets())
    stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    assert stitched.stitch.core.weight.is_cuda
    assert stitched(torch.randn(4, 3, 32, 32, device="cuda")).shape == (4, 10)


class _Pair(nn.Module):
    """A layer whose output is a tuple ``(p, q)``: ``sender_output=1`` must mean ``q`` everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), 3 * self.b(x)


class _PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair, self.mid, self.head = _Pair(), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, q = self.pair(x)
        return self.head(torch.relu(self.mid(q)))


@pytest.mark.parametrize("cache", [False, True])
def test_output_selectors_are_honoured_by_every_path(cache):
    """The forward, evaluation, training's loss, the cache, the MSE target and least squares read the same tensor."""
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    sender, receiver = _PairNet(), _PairNet()
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    s = ms.stitch(sender, "pair", receiver, "pair", example_input=x[:2], sender_output=1, receiver_output=1)
    with torch.no_grad():
        q = sender.pair(x)[1]
        torch.testing.assert_close(s.provided_representation(x), q)
        torch.testing.assert_close(s.expected_representation(x), receiver.pair(x)[1])
        direct = F.cross_entropy(s(x), y).item()
    assert ms.evaluate(s, [(x, y)], device="cpu")["loss"] == pytest.approx(direct, rel=1e-6)
    data = TensorDataset(x, y)
    recipe = ms.Recipe.paper(epochs=1, batch_size=64, lr=1e-12, warmup=0.0)
    task = ms.train_stitch(s, data, recipe=recipe, device="cpu", progress=False, cache=cache)
    assert task.epoch_losses[0] == pytest.approx(direct, rel=1e-5)  # one step: the loss before it
    with torch.no_grad():
        mse = F.mse_loss(s.stitch(q), receiver.pair(x)[1]).item()
    result = ms.train_stitch(s, data, objective="mse", recipe=recipe, device="cpu", progress=False, cache=cache)
    assert result.epoch_losses[0] == pytest.approx(mse, rel=1e-5)
    ms.fit_least_squares(s, [(x, y)], ridge=0.0)
    with torch.no_grad():  # receiver.pair.b is linear in x, and so is q: least squares recovers it (float32 products)
        torch.testing.assert_close(s.stitch(q), receiver.pair(x)[1], atol=1e-3, rtol=1e-3)
    assert no_hooks_left(sender) and no_hooks_left(receiver)


def test_the_model_reported_token_grid_is_used_by_stitch():
    """A 4x6 patch grid plus a class token is 25 tokens: square by chance, but the CLS token is no patch."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=2, num_classes=10)
    resnet = ms.zoo.small_resnet("R1111", width=4)
    s = ms.stitch(vit, "blocks.1", resnet, "layer1.0", example_input=torch.randn(2, 3, 32, 48))
    to_map = s.stitch.pre[0]
    assert isinstance(to_map, ms.stitches.TokensToMap)
    assert (to_map.prefix, to_map.grid) == (1, (4, 6))
    assert s(torch.randn(2, 3, 32, 48)).shape == (2, 10)
