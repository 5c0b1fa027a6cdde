from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import modelstitch as ms
from tests.helpers import TupleNet, call_counter, no_hooks_left


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_capture_equals_hand_sliced_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    x = torch.randn(3, 3, 8, 8)
    with ms.capture(net, ["0", "2", "4"]) as acts:
        net(x)
    for k in (0, 2, 4):
        assert torch.equal(acts[str(k)], net[: k + 1](x))
    assert no_hooks_left(net)


def test_capture_torchvision_resnet_matches_manual_forward(resnet):
    x = torch.randn(2, 3, 32, 32)
    with ms.capture(resnet, ["layer1.0", "layer4"]) as acts:
        resnet(x)
    r = resnet
    h = r.maxpool(r.relu(r.bn1(r.conv1(x))))
    assert torch.equal(acts["layer1.0"], r.layer1[0](h))
    h = r.layer3(r.layer2(r.layer1(h)))
    assert torch.allclose(acts["layer4"], r.layer4(h))
    assert acts["layer4"].shape == (2, 512, 1, 1)


def test_input_is_captured(resnet):
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ms.activations(resnet, x, ["input"])["input"], x)


@pytest.mark.parametrize("order", [["layer1.0", "layer2.0"], ["layer2.0", "layer1.0"]])
def test_early_stop_skips_later_layers_whatever_the_order(resnet, order):
    counts, handles = call_counter(resnet)
    try:
        out = ms.activations(resnet, torch.randn(1, 3, 32, 32), order)
    finally:
        for h in handles:
            h.remove()
    assert set(out) == set(order)
    assert counts["layer2.0"] == 1
    assert counts["layer3.0"] == 0 and counts["fc"] == 0


def test_bare_name_of_reused_module_raises(resnet):
    with pytest.raises(ms.StitchError, match="more than once"):
        ms.activations(resnet, torch.randn(1, 3, 32, 32), ["layer1.0.relu"])
    assert no_hooks_left(resnet)


def test_call_index_selects_each_call(resnet):
    x = torch.randn(1, 3, 32, 32)
    acts = ms.activations(resnet, x, ["layer1.0.relu:0", "layer1.0.relu:1", "layer1.0"])
    assert torch.equal(acts["layer1.0.relu:1"], acts["layer1.0"])
    assert not torch.equal(acts["layer1.0.relu:0"], acts["layer1.0.relu:1"])


def test_clone_protects_from_inplace_ops(resnet):
    # bn1's output is modified in place by the inplace ReLU that follows it.
    x = torch.randn(2, 3, 32, 32)
    with ms.capture(resnet, ["layer1.0.bn1"], clone=False) as raw:
        resnet(x)
    with ms.capture(resnet, ["layer1.0.bn1"]) as copied:
        resnet(x)
    assert (raw["layer1.0.bn1"] >= 0).all()  # clobbered by the ReLU
    assert (copied["layer1.0.bn1"] < 0).any()  # the real BatchNorm output


def test_unknown_name_suggests_close_matches(resnet):
    with (
        pytest.raises(ms.StitchError, match=r"no layer 'layer3\.01'.*'layer3\.0'.*list_layers"),
        ms.capture(resnet, ["layer3.01"]),
    ):
        pass


@pytest.mark.parametrize(
    ("layer", "message"),
    [("layer1.0:x", "call index"), ("input:1", "no call index"), ("", "no layer"), (3, "string")],
)
def test_bad_addresses(resnet, layer, message):
    with pytest.raises(ms.StitchError, match=message):
        ms.activations(resnet, torch.randn(1, 3, 32, 32), [layer])


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_removed_on_exceptions(resnet, error):
    with pytest.raises(type(error)), ms.capture(resnet, ["layer1.0", "input"], stop=True):
        raise error
    assert no_hooks_left(resnet)


def test_nested_captures_do_not_disturb_each_other(resnet):
    x = torch.randn(1, 3, 32, 32)
    with ms.capture(resnet, ["layer4"]) as outer:
        with ms.capture(resnet, ["layer1.0"], stop=True) as inner:
            resnet(x)
        assert "layer4" not in outer  # the inner capture stopped that forward
        resnet(x)
    assert inner["layer1.0"].shape == (1, 64, 8, 8)
    assert outer["layer4"].shape == (1, 512, 1, 1)
    assert no_hooks_left(resnet)


def test_structured_outputs_and_selectors():
    net = TupleNet()
    x = torch.randn(5, 4)
    first = ms.activations(net, x, ["pair"])["pair"]
    second = ms.activations(net, x, ["pair"], output=1)["pair"]
    assert torch.equal(first, net.pair.a(x)) and torch.equal(second, net.pair.b(x))
    by_fn = ms.activations(net, x, ["pair"], output=lambda out: out[0] + out[1])["pair"]
    assert torch.allclose(by_fn, first + second)
    with pytest.raises(ms.StitchError, match="cannot select 7"):
        ms.activations(net, x, ["pair"], output=7)


def test_activations_detach_device_and_missing_layer():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4)
    kept = ms.activations(net, x, ["0"], detach=False)["0"]
    assert kept.requires_grad
    assert not ms.activations(net, x, ["0"])["0"].requires_grad
    assert ms.activations(net, x, ["0"], device="cpu")["0"].device.type == "cpu"
    unused = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})
    unused.forward = lambda inp: unused["used"](inp)  # type: ignore[method-assign]
    with pytest.raises(ms.StitchError, match="did not run"):
        ms.activations(unused, x, ["unused"])


def test_reading_an_unrun_layer_raises():
    net = nn.Sequential(nn.Linear(4, 3))
    with ms.capture(net, ["0"]) as acts:
        with pytest.raises(ms.StitchError, match="has not run yet"):
            acts["0"]
        with pytest.raises(ms.StitchError, match="was not captured"):
            acts["1"]


def test_layer_specs_in_execution_order_with_call_counts(resnet):
    specs = ms.layer_specs(resnet, torch.randn(1, 3, 32, 32))
    names = [s.name for s in specs]
    assert names[0] == "input" and names[-1] == "fc"
    assert names.index("layer1.0.relu:0") < names.index("layer1.0.conv2") < names.index("layer1.0.relu:1")
    by_name = {s.name: s for s in specs}
    assert by_name["layer1.0.relu:1"].calls == 2
    assert by_name["layer3.0"].shape == (256, 2, 2) and by_name["layer3.0"].calls == 1
    assert by_name["fc"].layout == "vector" and by_name["layer2"].layout == "map"
    assert set(names) - {"input"} <= {n for n in ms.list_layers(resnet)} | {
        f"{n}:{k}" for n in ms.list_layers(resnet) for k in range(2)
    }


def test_layer_specs_leaves_model_untouched(resnet):
    resnet.train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    ms.layer_specs(resnet, torch.randn(4, 3, 32, 32), ["layer2.0"])
    assert resnet.training and all(m.training for m in resnet.modules())
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    resnet.eval()
    with pytest.raises(ms.StitchError, match="runs 2 times"):
        ms.layer_specs(resnet, torch.randn(1, 3, 32, 32), ["layer1.0.relu"])


def test_list_layers_names_every_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    assert ms.list_layers(net) == ["input", "0", "1", "1.0"]


class _Guarded(nn.Module):
    """A model whose forward catches every Exception (as some research code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 2)
        self.second_ran = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.first(x)
        except Exception:
            h = x
        self.second_ran += 1
        return self.second(h)


def test_early_stop_is_not_swallowed_by_a_models_except_exception():
    model = _Guarded()
    out = ms.activations(model, torch.randn(3, 4), ["first"])
    assert out["first"].shape == (3, 4)
    assert model.second_ran == 0  # the forward stopped right after 'first'
