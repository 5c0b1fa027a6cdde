from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import modelstitch as ms
from tests.helpers import SkipNet, TupleNet, call_counter, no_hooks_left

# (model factory, input shape, layer, method that "auto" must pick)
CASES = [
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), "layer2.0", "graph"),
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), "layer1.0.relu:1", "graph"),
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), "layer2.0.conv1", "hook"),
    (lambda: timm.create_model("resnet18", num_classes=10), (2, 3, 32, 32), "layer3.1", "graph"),
    (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), (1, 3, 224, 224), "blocks.5", "graph"),
    (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), (1, 3, 224, 224), "blocks.5.attn", "hook"),
    (SkipNet, (2, 3, 8, 8), "body", "hook"),
    (SkipNet, (2, 3, 8, 8), "head_in", "graph"),
    (SkipNet, (2, 3, 8, 8), "input", "graph"),
]


@pytest.mark.parametrize(("factory", "shape", "layer", "method"), CASES)
def test_suffix_of_captured_activation_equals_full_forward(factory, shape, layer, method):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape)
    rest = ms.suffix(model, layer, example_input=x)
    assert rest.method == method, rest.reason
    rep = ms.activations(model, x, [layer])[layer]
    with torch.no_grad():
        full = model(x)
        cut = rest(rep, x)
        forced_hook = ms.suffix(model, layer, method="hook")(rep, x)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forced_hook, full, rtol=1e-5, atol=1e-5)
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    ("factory", "shape", "layer", "before", "after"),
    [
        (
            lambda: torchvision.models.resnet18(num_classes=10),
            (2, 3, 32, 32),
            "layer2.0",
            "layer1.1.conv1",
            "layer2.1.conv1",
        ),
        (
            lambda: timm.create_model("vit_tiny_patch16_224"),
            (1, 3, 224, 224),
            "blocks.5",
            "patch_embed.proj",
            "blocks.6.attn.qkv",
        ),
        (SkipNet, (2, 3, 8, 8), "head_in", "stem", "fc"),
    ],
)
def test_graph_cut_does_not_run_the_prefix(factory, shape, layer, before, after):
    model = factory().eval()
    x = torch.randn(shape)
    rest = ms.suffix(model, layer, example_input=x)
    rep = ms.activations(model, x, [layer])[layer]
    counts, handles = call_counter(model)
    try:
        with torch.no_grad():
            rest(rep)
    finally:
        for h in handles:
            h.remove()
    assert counts[before] == 0 and counts[layer] == 0 and counts[after] == 1


def test_hook_fallback_needs_the_original_input():
    model = SkipNet().eval()
    rest = ms.suffix(model, "body")
    assert rest.needs_input and "skip connection" in rest.reason
    with pytest.raises(ms.StitchError, match="needs the original input"):
        rest(torch.randn(2, 8, 8, 8))
    with pytest.raises(ms.StitchError, match="cannot cut"):
        ms.suffix(model, "body", method="graph")


def test_hook_fallback_checks_replacement_shape():
    model = SkipNet().eval()
    rest = ms.suffix(model, "body", method="hook")
    with pytest.raises(ms.StitchError, match="has shape"):
        rest(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 8, 8))
    assert no_hooks_left(model)


def test_tuple_output_layer_falls_back_and_replaces_the_selected_element():
    torch.manual_seed(0)
    model = TupleNet().eval()
    x = torch.randn(3, 4)
    for selector in (0, 1):
        rest = ms.suffix(model, "pair", example_input=x, output=selector)
        rep = ms.activations(model, x, ["pair"], output=selector)["pair"]
        torch.testing.assert_close(rest(rep, x), model(x))
        # a different replacement changes the output through the chosen element only
        changed = rest(torch.zeros_like(rep), x)
        a, b = model.pair(x)
        a, b = (torch.zeros_like(a), b) if selector == 0 else (a, torch.zeros_like(b))
        torch.testing.assert_close(changed, model.fc(model.act(a) + model.act(b)))


def test_reused_module_needs_call_index():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(ms.StitchError, match="runs 2 times"):
        ms.suffix(model, "layer1.0.relu")


def test_prefix_stops_at_layer_and_shares_weights():
    model = SkipNet().eval()
    x = torch.randn(2, 3, 8, 8)
    head = ms.prefix(model, "stem")
    torch.testing.assert_close(head(x), model.stem(x))
    assert list(head.parameters()) == []  # shares, does not own, the model's weights
    assert torch.equal(ms.prefix(model, "input")(x), x)


def test_suffix_follows_device_and_dtype_moves():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    rest = ms.suffix(model, "0")
    model.double()
    assert rest(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
