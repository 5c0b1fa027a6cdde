"""Tests for modelstitch.zoo: architectures, layer names, training, files."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelstitch._errors import StitchError
from modelstitch.core._checkpoint import load_checkpoint, save_checkpoint
from modelstitch.data import digits
from modelstitch.zoo import (
    ARCHITECTURES,
    CLASSIFIER_RECIPE,
    SmallResNet,
    architecture_name,
    evaluate_classifier,
    layer_names,
    load_model,
    parse_blocks,
    random_control,
    save_model,
    small_resnet,
    train_classifier,
)


def _count_params(blocks: tuple[int, ...], width: int, num_classes: int) -> int:
    """Parameters of a SmallResNet, counted from the layout by hand."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    total = conv(3, width, 3) + bn(width)
    cin = width
    for stage, count in enumerate(blocks):
        cout = width * 2**stage
        for i in range(count):
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            stride = 2 if stage > 0 and i == 0 else 1
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    ("blocks", "width", "num_classes"),
    [("R1111", 8, 10), ("R2222", 4, 10), ((1, 2, 1, 3), 6, 7), ("R1121", 16, 100)],
)
def test_small_resnet_output_shape(blocks, width, num_classes):
    model = small_resnet(blocks, width=width, num_classes=num_classes)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, num_classes)
    assert isinstance(model, SmallResNet)
    assert model.blocks == parse_blocks(blocks)
    assert model.width == width
    assert model.fc.in_features == 8 * width


def test_module_names_and_layout():
    model = small_resnet("R1211", width=8)
    children = [name for name, _ in model.named_children()]
    assert children == ["stem", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc"]
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].bias is None
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert isinstance(model.stem[1], nn.BatchNorm2d) and isinstance(model.stem[2], nn.ReLU)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert len(blocks) == 5
    assert model.layer1[0].downsample is None  # same shape in stage 1
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer2[1].downsample is None
    assert "R1211" in repr(model) and repr(model).startswith("SmallResNet(")


def test_he_initialisation_like_torchvision():
    torch.manual_seed(0)
    model = small_resnet("R2222", width=64)
    conv = model.layer3[0].conv1  # 128 -> 256, 3x3: fan_out = 256 * 9
    expected_std = math.sqrt(2.0 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.all(model.layer1[0].bn1.weight == 1) and torch.all(model.layer1[0].bn1.bias == 0)


@pytest.mark.parametrize("blocks", ["R1111", "R2121", "R1212", (3, 1, 2, 1)])
def test_layer_names_exist_and_stage_shapes(blocks):
    width = 4
    model = small_resnet(blocks, width=width).eval()
    names = layer_names(model)
    counts = parse_blocks(blocks)
    assert len(names) == 1 + sum(counts)
    assert names == layer_names(blocks)
    modules = dict(model.named_modules())
    assert all(name in modules for name in names)

    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in names
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()

    assert shapes["stem"] == (2, width, 32, 32)
    for stage in range(4):
        channels, side = width * 2**stage, 32 // 2**stage
        for i in range(counts[stage]):
            assert shapes[f"layer{stage + 1}.{i}"] == (2, channels, side, side)


def test_layer_names_torchvision_resnets():
    for builder, counts in ((torchvision.models.resnet18, (2, 2, 2, 2)), (torchvision.models.resnet34, (3, 4, 6, 3))):
        model = builder(num_classes=10)
        names = layer_names(model)
        assert names[0] == "relu"
        assert len(names) == 1 + sum(counts)
        assert names[1] == "layer1.0" and names[-1] == f"layer4.{counts[3] - 1}"
        modules = dict(model.named_modules())
        assert all(name in modules for name in names)


def test_layer_names_refuses_unknown_models():
    with pytest.raises(StitchError, match="named_modules"):
        layer_names(nn.Sequential(nn.Linear(2, 2)))


def test_resnet18_and_34_parameter_counts():
    resnet18 = small_resnet((2, 2, 2, 2), width=64)
    n18 = sum(p.numel() for p in resnet18.parameters())
    assert n18 == _count_params((2, 2, 2, 2), 64, 10) == 11_173_962
    # torchvision's ResNet18 differs only in its 7x7 stem conv (3*64*49) versus our 3x3 (3*64*9).
    tv18 = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert n18 == tv18 - 3 * 64 * 49 + 3 * 64 * 9

    resnet34 = small_resnet((3, 4, 6, 3), width=64)
    n34 = sum(p.numel() for p in resnet34.parameters())
    assert n34 == _count_params((3, 4, 6, 3), 64, 10) == 21_282_122
    assert resnet34.architecture == "R3463"


@pytest.mark.parametrize(
    "bad",
    ["R12", "R0111", "X1111", "1111", "R11111", "", (1, 2, 3), (1, 0, 1, 1), (1.0, 1, 1, 1), (True, 1, 1, 1), 7, None],
)
def test_bad_blocks_raise_with_example(bad):
    with pytest.raises(StitchError, match="R1211"):
        small_resnet(bad)


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"width": 2.5}, {"num_classes": 0}])
def test_bad_width_or_classes(kwargs):
    with pytest.raises(StitchError):
        small_resnet("R1111", **kwargs)


def test_architecture_names():
    assert len(ARCHITECTURES) == 16 and len(set(ARCHITECTURES)) == 16
    assert ARCHITECTURES[0] == "R1111" and ARCHITECTURES[1] == "R1112" and ARCHITECTURES[-1] == "R2222"
    assert list(ARCHITECTURES) == sorted(ARCHITECTURES)
    assert all(architecture_name(parse_blocks(name)) == name for name in ARCHITECTURES)
    assert architecture_name((3, 4, 23, 3)) == "R3-4-23-3"
    assert parse_blocks("R3-4-23-3") == (3, 4, 23, 3)


# --------------------------------------------------------------------------- random control


def test_random_control_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = random_control("R1211", seed=7, width=8)
    b = random_control("R1211", seed=7, width=8)
    c = random_control("R1211", seed=8, width=8)
    assert torch.equal(torch.get_rng_state(), state)

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])
    assert not a.training  # a frozen control
    assert a.architecture == "R1211" and a.width == 8

    with pytest.raises(StitchError):
        random_control("R1111", seed="0")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digit_splits():
    return digits(train=True), digits(train=False)


def test_train_classifier_on_digits_beats_chance(digit_splits):
    train, test = digit_splits
    model = random_control("R1111", seed=0, width=8)
    recipe = CLASSIFIER_RECIPE.replace(batch_size=64, epochs=3, seed=0)
    result = train_classifier(model, train, recipe=recipe, test_data=test, device="cpu", progress=False)
    # Measured 0.908-0.936 over seeds 0-9 (chance is 0.1).
    assert result["test_accuracy"] > 0.8
    assert result["epochs"] == 3 and result["steps"] == 3 * (len(train) // 64)
    assert math.isfinite(result["train_loss"]) and result["train_loss"] < 1.0
    assert not model.training
    again = evaluate_classifier(model, test, device="cpu")
    assert again["accuracy"] == pytest.approx(result["test_accuracy"])


def test_train_classifier_is_seeded(digit_splits):
    train, _ = digit_splits
    small = TensorDataset(train.tensors[0][:128], train.tensors[1][:128])
    recipe = CLASSIFIER_RECIPE.replace(batch_size=32, epochs=0.5, seed=3)
    results, weights = [], []
    for _ in range(2):
        model = random_control("R1111", seed=1, width=4)
        results.append(train_classifier(model, small, recipe=recipe, device="cpu", progress=False))
        weights.append(model.fc.weight.detach().clone())
    assert results[0]["steps"] == 2  # ceil(0.5 * 4 batches)
    assert results[0] == results[1]
    assert torch.equal(weights[0], weights[1])


def test_train_classifier_accepts_a_dataloader(digit_splits):
    train, _ = digit_splits
    small = TensorDataset(train.tensors[0][:64], train.tensors[1][:64])
    model = small_resnet("R1111", width=4)
    result = train_classifier(
        model,
        DataLoader(small, batch_size=16),
        recipe=CLASSIFIER_RECIPE.replace(epochs=1),
        device="cpu",
        progress=False,
    )
    assert result["steps"] == 4 and result["test_accuracy"] is None


def test_train_classifier_refuses_nan_data_naming_the_sample():
    x = torch.randn(8, 3, 32, 32)
    x[5] = float("nan")
    data = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    model = small_resnet("R1111", width=4)
    recipe = CLASSIFIER_RECIPE.replace(batch_size=4, epochs=1)
    with pytest.raises(StitchError, match=r"the training data holds NaN or infinite values: sample 5"):
        train_classifier(model, DataLoader(data, batch_size=4), recipe=recipe, device="cpu", progress=False)
    assert not model.training


def test_train_classifier_rejects_bad_data():
    model = small_resnet("R1111", width=4)
    with pytest.raises(StitchError, match="empty"):
        train_classifier(model, TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)), device="cpu")
    with pytest.raises(StitchError, match="Dataset, a DataLoader"):
        train_classifier(model, 42, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(StitchError, match="pairs"):
        train_classifier(model, [torch.zeros(3, 32, 32)] * 4, device="cpu", progress=False)


def test_evaluate_classifier_restores_mode_and_counts_correctly():
    model = small_resnet("R1111", width=4, num_classes=3)
    model.train()
    x = torch.randn(10, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    y = logits.argmax(1)
    y[:3] = (y[:3] + 1) % 3  # make exactly 3 wrong
    result = evaluate_classifier(model, TensorDataset(x, y), device="cpu", batch_size=4)
    assert model.training
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


# --------------------------------------------------------------------------- files


def test_save_and_load_model_round_trip(tmp_path):
    model = random_control("R1211", seed=0, width=4, num_classes=5)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
                m.running_var.uniform_(0.5, 2)
    path = save_model(tmp_path / "r1211.safetensors", model, dataset="digits", test_accuracy=0.9, seed=0)
    loaded = load_model(path, expected_architecture="R1211")
    assert isinstance(loaded, SmallResNet) and not loaded.training
    assert loaded.blocks == (1, 2, 1, 1) and loaded.width == 4 and loaded.num_classes == 5
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))

    meta = loaded.checkpoint_metadata
    assert meta["architecture"] == "R1211" and meta["blocks"] == [1, 2, 1, 1] and meta["width"] == 4
    assert meta["dataset"] == "digits" and meta["test_accuracy"] == 0.9 and meta["seed"] == 0
    assert meta["num_classes"] == 5 and "library_version" in meta


def test_load_model_refuses_other_architecture(tmp_path):
    path = save_model(tmp_path / "m.safetensors", small_resnet("R1111", width=4), dataset="digits")
    with pytest.raises(StitchError, match=r"R1111.*R2222"):
        load_model(path, expected_architecture="R2222")


def test_load_model_checks_metadata_against_weights(tmp_path):
    model = small_resnet("R1111", width=4)
    state, meta = load_checkpoint(save_model(tmp_path / "m.safetensors", model, dataset="digits"))

    lying = save_checkpoint(tmp_path / "arch.safetensors", state, {**meta, "architecture": "R2222"})
    with pytest.raises(StitchError, match="R2222"):
        load_model(lying)

    wide = save_checkpoint(tmp_path / "width.safetensors", state, {**meta, "width": 8})
    with pytest.raises(StitchError, match="shape"):
        load_model(wide)

    other = save_checkpoint(tmp_path / "other.safetensors", nn.Linear(2, 2), {"note": "not a zoo model"})
    with pytest.raises(StitchError, match="not a zoo model"):
        load_model(other)


def test_save_model_refuses_other_models(tmp_path):
    with pytest.raises(StitchError, match="SmallResNet"):
        save_model(tmp_path / "x.safetensors", nn.Linear(2, 2), dataset="x")  # type: ignore[arg-type]
