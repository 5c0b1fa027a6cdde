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
