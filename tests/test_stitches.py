"""Tests for `modelstitch.stitches`: shape rules, kinds, init, prefix tokens, errors."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelstitch._errors import StitchError
from modelstitch.core import ActivationSpec
from modelstitch.stitches import STITCH_KINDS, Stitch, make_stitch

pytestmark = pytest.mark.usefixtures("one_thread")


def _shape_of(x):
    return x.shape if isinstance(x, ActivationSpec) else tuple(x)


def _pre_names(stitch: Stitch) -> list[str]:
    mods = list(stitch.pre) if isinstance(stitch.pre, nn.Sequential) else [stitch.pre]
    return [type(m).__name__ for m in mods if not isinstance(m, nn.Identity)]


def _layer_sig(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        return ("Conv2d", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
    if isinstance(m, nn.Linear):
        return ("Linear", m.in_features, m.out_features)
    return (type(m).__name__,)


def _core_sig(stitch: Stitch) -> list[tuple]:
    mods = list(stitch.core) if isinstance(stitch.core, nn.Sequential) else [stitch.core]
    return [_layer_sig(m) for m in mods]


def _assert_error(provided, expected, **options) -> StitchError:
    with pytest.raises(StitchError) as info:
        make_stitch(provided, expected, **options)
    message = str(info.value)
    for side in (provided, expected):
        shown = str(_shape_of(side)) if isinstance(side, (ActivationSpec, tuple)) else repr(side)
        assert shown in message, (shown, message)
    return info.value


# ---------------------------------------------------------------------------- shape rules


class Rule(NamedTuple):
    provided: object
    expected: object
    options: dict
    pre: list[str]
    core: list[tuple]
    post: str
    bad: tuple  # (provided, expected, options): the nearest unsupported neighbour


VIT = (197, 192)  # ViT-Tiny: class token + 14x14 patches


def conv(c_in: int, c_out: int, k: int = 1) -> tuple:
    return ("Conv2d", c_in, c_out, k, k)


def lin(d_in: int, d_out: int) -> tuple:
    return ("Linear", d_in, d_out)


ID, M2T, UNF = "Identity", "MapToTokens", "Unflatten"
T2M, TR = "TokensToMap", "TokenResample"
RULES = [
    # map -> map
    Rule((64, 32, 32), (128, 16, 16), {}, [], [conv(64, 128, 2)], ID, bad=((64, 32, 32), (128, 0, 16), {})),
    Rule((64, 8, 8), (32, 32, 32), {}, ["Upsample"], [conv(64, 32)], ID, bad=((64, 8, 8, 1), (32, 32, 32), {})),
    Rule((16, 8, 8), (32, 8, 8), {}, [], [conv(16, 32)], ID, bad=((16, 8, 8), (32, 8, 8), {"kind": "conv"})),
    Rule((12, 10, 10), (7, 4, 4), {}, ["Resize"], [conv(12, 7)], ID, bad=((12, 10, 10), (7, 4, 4), {"init": "lstsq"})),
    Rule((8, 16, 8), (8, 8, 8), {}, ["Resize"], [conv(8, 8)], ID, bad=((8, 16, 8), (8, 8, 8), {"init": "zeros"})),
    Rule((8, 32, 16), (4, 16, 8), {}, [], [conv(8, 4, 2)], ID, bad=((8, 32, 16), (4, 16, 8), {"pool": "max"})),
    Rule((8, 4, 4), (4, 8, 12), {}, ["Resize"], [conv(8, 4)], ID, bad=((8, 4, 4), (4, 8, 12, 1), {})),
    # tokens -> tokens
    Rule(VIT, (197, 384), {}, [], [lin(192, 384)], ID, bad=(VIT, (197, 384), {"rank": 4})),
    Rule(VIT, (50, 384), {}, [TR], [lin(192, 384)], ID, bad=(VIT, (50, 384), {"num_prefix_tokens": 2})),
    Rule(VIT, (21, 64), {}, [TR], [lin(192, 64)], ID, bad=(VIT, (21, 64), {"num_prefix_tokens": (1, 21)})),
    Rule(
        (18, 8),
        (16, 8),
        {"num_prefix_tokens": (2, 0)},
        [TR],
        [lin(8, 8)],
        ID,
        bad=((18, 8), (16, 8), {"num_prefix_tokens": (3, 0)}),
    ),
    # tokens -> map
    Rule(VIT, (256, 8, 8), {}, [T2M, "Resize"], [conv(192, 256)], ID, bad=(VIT, (256, 8, 8), {"num_prefix_tokens": 0})),
    Rule(VIT, (256, 7, 7), {}, [T2M], [conv(192, 256, 2)], ID, bad=(VIT, (256, 7, 7), {"hidden": 8})),
    Rule(
        (50, 64),
        (32, 14, 14),
        {},
        [T2M, "Upsample"],
        [conv(64, 32)],
        ID,
        bad=((50, 64), (32, 14, 14), {"num_prefix_tokens": (1, 2, 3)}),
    ),
    # map -> tokens
    Rule(
        (256, 8, 8), VIT, {}, ["Resize"], [conv(256, 192)], M2T, bad=((256, 8, 8), VIT, {"num_prefix_tokens": (0, 0)})
    ),
    Rule((64, 28, 28), VIT, {}, [], [conv(64, 192, 2)], M2T, bad=((64, 28, 28), VIT, {"init": "identity"})),
    Rule((64, 7, 7), (50, 32), {}, [], [conv(64, 32)], M2T, bad=((64, 7, 7), (50, 32), {"num_prefix_tokens": -1})),
    # vectors
    Rule((512,), (10,), {}, [], [lin(512, 10)], ID, bad=((512,), (), {})),
    Rule((64, 8, 8), (10,), {}, ["Reduce"], [lin(64, 10)], ID, bad=((64, 8, 8), (10,), {"init": "identity"})),
    Rule(
        (64, 8, 8),
        (10,),
        {"pool": "flatten"},
        ["Flatten"],
        [lin(4096, 10)],
        ID,
        bad=((64, 8, 8), (10,), {"pool": "sum"}),
    ),
    Rule(VIT, (10,), {}, ["Reduce"], [lin(192, 10)], ID, bad=(VIT, (10, 0), {})),
    Rule((5, 4), (10,), {"pool": "flatten"}, ["Flatten"], [lin(20, 10)], ID, bad=((5, 4), (10,), {"kind": "lowrank"})),
    Rule((10,), (3, 4, 4), {}, [], [lin(10, 48)], UNF, bad=((10,), (3, 4, 4), {"kind": "lowrank", "rank": 11})),
    Rule((10,), (5, 6), {}, [], [lin(10, 30)], UNF, bad=((10,), (5, 6), {"kind": "mlp", "hidden": 0})),
    # ActivationSpec inputs
    Rule(
        ActivationSpec("blocks.3", VIT),
        ActivationSpec("layer3", (256, 8, 8)),
        {},
        [T2M, "Resize"],
        [conv(192, 256)],
        ID,
        bad=(ActivationSpec("blocks.3", VIT), ActivationSpec("x", (1, 1, 1, 1)), {}),
    ),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{_shape_of(r.provided)}->{_shape_of(r.expected)}")
def test_shape_rule(rule: Rule) -> None:
    stitch = make_stitch(rule.provided, rule.expected, **rule.options)
    assert (_pre_names(stitch), _core_sig(stitch), type(stitch.post).__name__) == (rule.pre, rule.core, rule.post)
    assert stitch.kind == "linear" and stitch.linear is stitch.core
    assert stitch.kernel == (rule.core[0][3] if rule.core[0][0] == "Conv2d" else 1)
    both_tokens = len(stitch.provided) == len(stitch.expected) == 2
    assert stitch.core_layout == ("map" if rule.core[0][0] == "Conv2d" else "tokens" if both_tokens else "vector")
    x = torch.randn(2, *_shape_of(rule.provided))
    assert stitch(x).shape == (2, *_shape_of(rule.expected))
    assert [n for n, _ in stitch.named_children()] == ["pre", "core", "post"]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{_shape_of(r.bad[0])}->{_shape_of(r.bad[1])}")
def test_shape_rule_neighbour_fails(rule: Rule) -> None:
    provided, expected, options = rule.bad
    _assert_error(provided, expected, **options)


@pytest.mark.parametrize(
    ("provided", "expected"),
    [(5, (3,)), ("abc", (3,)), ((2.0,), (3,)), ((True, 2), (3,)), ((3,), None)],
)
def test_malformed_shapes_fail(provided, expected) -> None:
    _assert_error(provided, expected)


def test_shapes_accept_torch_size_and_lists() -> None:
    assert make_stitch(torch.Size([4, 2, 2]), [3]).expected == (3,)


def test_upsample_factor_and_resize_size() -> None:
    assert make_stitch((64, 8, 8), (32, 32, 32)).pre.scale_factor == 4
    assert make_stitch((12, 10, 10), (7, 4, 4)).pre.size == (4, 4)
    assert "size=(4, 4)" in repr(make_stitch((12, 10, 10), (7, 4, 4)))


def test_core_layouts() -> None:
    assert make_stitch(VIT, (50, 384)).core_layout == "tokens"
    assert make_stitch(VIT, (10,)).core_layout == "vector"
    assert make_stitch((10,), (5, 6)).core_layout == "vector"
    assert make_stitch((256, 8, 8), VIT).core_layout == "map"


def test_resize_matches_bilinear_interpolate() -> None:
    stitch = make_stitch((3, 10, 10), (3, 4, 4), init="identity")
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(stitch(x), F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False))


def test_repr_names_shapes_and_kind() -> None:
    text = repr(make_stitch((64, 32, 32), (128, 16, 16), kind="bn"))
    assert "(64, 32, 32) -> (128, 16, 16)" in text and "kind='bn'" in text


def test_forward_checks_input_shape() -> None:
    stitch = make_stitch((64, 8, 8), (10,))
    with pytest.raises(StitchError, match=r"\(64, 8, 8\)"):
        stitch(torch.randn(2, 64, 4, 4))


@pytest.mark.parametrize(
    ("provided", "expected"),
    [((256, 8, 8), VIT), ((10,), (3, 4, 4)), ((10,), (5, 6)), (VIT, (50, 8)), ((4, 8, 8), (4, 4, 4))],
)
def test_invert_post_undoes_post(provided, expected) -> None:
    stitch = make_stitch(provided, expected)
    y = stitch(torch.randn(3, *provided))
    z = stitch.invert_post(y)
    assert z.shape == stitch.core(stitch.pre(torch.randn(3, *provided))).shape
    torch.testing.assert_close(stitch.post(z), y)


# ---------------------------------------------------------------------------- kinds

KINDS = [
    # (provided, expected, options, core signature), then the failing neighbour's options
    (
        (64, 32, 32),
        (128, 16, 16),
        {"kind": "bn"},
        [("BatchNorm2d",), conv(64, 128, 2), ("BatchNorm2d",)],
        {"kind": "bn", "init": "identity"},
    ),
    (
        (50, 16),
        (50, 8),
        {"kind": "bn"},
        [("TokenBatchNorm",), lin(16, 8), ("TokenBatchNorm",)],
        {"kind": "bn", "rank": 2},
    ),
    ((16,), (8,), {"kind": "bn"}, [("BatchNorm1d",), lin(16, 8), ("BatchNorm1d",)], {"kind": "batchnorm"}),
    (
        (64, 32, 32),
        (128, 16, 16),
        {"kind": "lowrank", "rank": 8},
        [conv(64, 8, 2), conv(8, 128)],
        {"kind": "lowrank", "rank": 65},
    ),
    (VIT, (50, 64), {"kind": "lowrank", "rank": 64}, [lin(192, 64), lin(64, 64)], {"kind": "lowrank", "rank": 0}),
    ((16,), (8,), {"kind": "lowrank", "rank": 1}, [lin(16, 1), lin(1, 8)], {"kind": "lowrank", "rank": 2.0}),
    (
        (64, 32, 32),
        (128, 16, 16),
        {"kind": "mlp"},
        [conv(64, 128, 2), ("ReLU",), conv(128, 128)],
        {"kind": "mlp", "hidden": -3},
    ),
    (VIT, (10,), {"kind": "mlp", "hidden": 32}, [lin(192, 32), ("ReLU",), lin(32, 10)], {"kind": "mlp", "rank": 3}),
    ((16,), (8,), {"kind": "auto"}, [lin(16, 8)], {"kind": None}),
]


@pytest.mark.parametrize(("provided", "expected", "options", "core", "bad_options"), KINDS)
def test_kind(provided, expected, options, core, bad_options) -> None:
    stitch = make_stitch(provided, expected, **options)
    assert _core_sig(stitch) == core
    assert stitch.kind == ("linear" if options["kind"] == "auto" else options["kind"])
    assert (stitch.linear is stitch.core) == (stitch.kind == "linear")
    assert stitch(torch.randn(4, *provided)).shape == (4, *expected)
    _assert_error(provided, expected, **bad_options)


def test_lowrank_first_layer_has_no_bias() -> None:
    assert all(m.bias is None for m in make_stitch((64, 32, 32), (128, 16, 16), kind="lowrank", rank=8).core[:1])
    assert make_stitch(VIT, (50, 64), kind="lowrank", rank=4).core[0].bias is None


def test_token_batchnorm_normalises_last_dim() -> None:
    stitch = make_stitch((9, 6), (9, 5), kind="bn").train()
    y = stitch(torch.randn(8, 9, 6) * 5 + 3)
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 1), unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_stitch_kinds_lists_every_kind() -> None:
    assert STITCH_KINDS == ("auto", "linear", "bn", "lowrank", "mlp")


# ---------------------------------------------------------------------------- identity init

IDENTITY = [
    # (provided, expected), then a failing neighbour (provided, expected, options)
    (((16, 8, 8), (16, 8, 8)), ((16, 8, 8), (17, 8, 8), {"init": "identity"})),
    (((197, 64), (197, 64)), ((197, 64), (197, 64), {"init": "identity", "kind": "bn"})),
    (((10,), (10,)), ((10,), (11,), {"init": "identity"})),
    (((48,), (3, 4, 4)), ((48,), (3, 4, 4), {"init": "identity", "kind": "mlp"})),
]


@pytest.mark.parametrize(("ok", "bad"), IDENTITY)
def test_identity_init_is_exact(ok, bad) -> None:
    provided, expected = ok
    stitch = make_stitch(provided, expected, init="identity")
    x = torch.randn(3, *provided)
    assert torch.equal(stitch(x), x.reshape(3, *expected))
    error = _assert_error(bad[0], bad[1], **bad[2])
    assert "identity" in str(error)


def test_identity_init_downsampling_is_average_pooling() -> None:
    stitch = make_stitch((8, 16, 16), (8, 4, 4), init="identity")
    x = torch.randn(2, 8, 16, 16)
    assert stitch.kernel == 4
    torch.testing.assert_close(stitch(x), F.avg_pool2d(x, 4))
    _assert_error((8, 16, 16), (9, 4, 4), init="identity")


def test_identity_init_tokens_to_map_pools_the_grid() -> None:
    stitch = make_stitch(VIT, (192, 7, 7), init="identity")
    x = torch.randn(2, *VIT)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14)
    torch.testing.assert_close(stitch(x), F.avg_pool2d(grid, 2))


def test_unknown_init_mentions_lstsq() -> None:
    assert "init='lstsq', init_data=" in str(_assert_error((4,), (4,), init="lstsq"))


# ---------------------------------------------------------------------------- prefix tokens


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_equal_prefix_counts_pass_the_class_token_through_core(kind: str) -> None:
    stitch = make_stitch((197, 16), (50, 8), kind=kind)  # 1 + 14x14 -> 1 + 7x7
    x = torch.randn(2, 197, 16)
    torch.testing.assert_close(stitch(x)[:, 0], stitch.core(x[:, 0]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_new_prefix_tokens_are_the_patch_mean(kind: str) -> None:
    stitch = make_stitch((197, 16), (21, 8), kind=kind)  # 1 + 14x14 -> 5 + 4x4 (class + 4 registers)
    x = torch.randn(2, 197, 16)
    y = stitch(x)
    mean = stitch.core(x[:, 1:].mean(dim=1))
    for i in range(5):
        torch.testing.assert_close(y[:, i], mean)


def test_explicit_prefix_pair_drops_prefix_tokens() -> None:
    stitch = make_stitch((18, 8), (16, 8), num_prefix_tokens=(2, 0), init="identity")
    x = torch.randn(2, 18, 8)
    torch.testing.assert_close(stitch(x), x[:, 2:])


def test_map_to_tokens_prefix_is_patch_mean() -> None:
    y = make_stitch((32, 8, 8), (66, 16))(torch.randn(2, 32, 8, 8))  # 2 prefix + 8x8
    torch.testing.assert_close(y[:, 0], y[:, 2:].mean(dim=1))
    torch.testing.assert_close(y[:, 1], y[:, 2:].mean(dim=1))


def test_equal_token_counts_need_no_grid() -> None:
    stitch = make_stitch((77, 512), (77, 256))  # text tokens: no square grid, no resampling
    assert isinstance(stitch.pre, nn.Identity)


# ---------------------------------------------------------------------------- properties


@st.composite
def _side(draw) -> tuple[tuple[int, ...], int]:
    """A valid per-sample shape and its prefix-token count (0 unless tokens)."""
    layout = draw(st.sampled_from(["vector", "tokens", "map"]))
    if layout == "vector":
        return (draw(st.integers(1, 24)),), 0
    if layout == "tokens":
        prefix, grid = draw(st.integers(0, 2)), draw(st.integers(1, 5))
        return (prefix + grid * grid, draw(st.integers(1, 12))), prefix
    return (draw(st.integers(1, 6)), draw(st.integers(1, 16)), draw(st.integers(1, 16))), 0


@settings(max_examples=80, deadline=None)
@given(
    a=_side(),
    b=_side(),
    kind=st.sampled_from(["linear", "bn", "lowrank", "mlp"]),
    pool=st.sampled_from(["avg", "flatten"]),
    explicit_prefix=st.booleans(),
    data=st.data(),
)
def test_property_valid_pairs(a, b, kind, pool, explicit_prefix, data) -> None:
    (provided, p_in), (expected, p_out) = a, b
    options = {"pool": pool, "num_prefix_tokens": (p_in, p_out) if explicit_prefix else None}
    if kind == "lowrank":
        weight = make_stitch(provided, expected, **options).linear.weight  # [out, in] or [out, in, k, k]
        c_out, c_in = weight.shape[:2]
        options["rank"] = data.draw(st.integers(1, min(c_in, c_out)))
    stitch = make_stitch(provided, expected, kind=kind, **options)
    assert list(stitch.pre.parameters()) == [] and list(stitch.post.parameters()) == []
    x = torch.randn(3, *provided, requires_grad=True)
    y = stitch(x)
    assert y.shape == (3, *expected)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    grads = [p.grad for p in stitch.core.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@st.composite
def _invalid(draw) -> tuple[tuple[int, ...], tuple[int, ...], dict]:
    """An unsupported (provided, expected, options) triple."""
    (good, _), (other, _) = draw(_side()), draw(_side())
    how = draw(st.sampled_from(["rank", "zero", "grid", "lowrank"]))
    if how == "rank":
        bad = tuple(draw(st.lists(st.integers(1, 4), min_size=4, max_size=5))) if draw(st.booleans()) else ()
    elif how == "zero":
        bad = list(good)
        bad[draw(st.integers(0, len(bad) - 1))] = 0
        bad = tuple(bad)
    elif how == "grid":  # tokens whose patch count is no square, stitched to a map
        grid, extra, prefix = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
        extra = min(extra, 2 * grid)
        n = prefix + grid * grid + extra
        return (n, 4), (3, 4, 4), {"num_prefix_tokens": (prefix, 0)}
    else:
        return good, other, {"kind": "lowrank", "rank": draw(st.sampled_from([0, -1, 10_000]))}
    return (bad, other, {}) if draw(st.booleans()) else (other, bad, {})


@settings(max_examples=80, deadline=None)
@given(case=_invalid())
def test_property_invalid_pairs_raise(case) -> None:
    provided, expected, options = case
    _assert_error(provided, expected, **options)


def test_grid_error_when_default_prefix_is_overridden() -> None:
    assert math.isqrt(196) == 14
    _assert_error(VIT, (256, 8, 8), num_prefix_tokens=2)


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp", "bn"])
@pytest.mark.parametrize(
    ("provided", "expected", "factor", "c_in"),
    [((8, 2, 2), (4, 8, 8), 4, 8), ((4, 3, 3), (8, 6, 6), 2, 4), ((50, 8), (4, 14, 14), 2, 8)],  # tokens: 7x7 grid
)
def test_upsampling_after_the_core_is_the_same_function(kind, provided, expected, factor, c_in) -> None:
    """A pointwise core runs before the nearest upsampling when that upsamples fewer channels; nothing else changes."""
    torch.manual_seed(0)
    stitch = make_stitch(provided, expected, kind=kind, **({"rank": 2} if kind == "lowrank" else {}))
    assert _pre_names(stitch)[-1] == "Upsample" and stitch.upsample == factor
    assert stitch.upsample_after_core == (kind != "bn" and expected[0] <= c_in)
    x = torch.randn(6, *provided)
    for train in (True, False):
        stitch.train(train)
        late = stitch(x)
        stitch.zero_grad()
        late.square().sum().backward()
        grads = [p.grad.clone() for p in stitch.parameters()]
        stitch.zero_grad()
        early = stitch.post(stitch.core(stitch.pre(x)))  # the declared order: pre, core, post
        early.square().sum().backward()
        torch.testing.assert_close(late, early, rtol=1e-5, atol=1e-6)
        for g, p in zip(grads, stitch.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- rectangular patch grids


def _rect_vit(**options) -> nn.Module:
    """A 2-block timm ViT-Tiny on 32x48 images with 8x8 patches: 1 class token + a 4x6 grid = 25 tokens."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=2, num_classes=10, **options
    ).eval()


def test_rectangular_vit_into_resnet_drops_only_the_class_token() -> None:
    """The user's case: 25 = 1 + 4x6 tokens are not 0 + 5x5 once the model's layout is passed."""
    from modelstitch.core import layer_specs
    from modelstitch.stitches import TokensToMap, token_layout
    from modelstitch.zoo import small_resnet

    vit, resnet, x = _rect_vit(), small_resnet("R1111", width=4), torch.randn(2, 3, 32, 48)
    ((provided,), (expected,)) = layer_specs(vit, x, ["blocks.1"]), layer_specs(resnet, x, ["layer1.0"])
    assert (provided.shape, expected.shape) == ((25, 192), (4, 32, 48))
    assert _pre_names(make_stitch(provided, expected)) == [T2M, "Resize"]  # the square guess, kept when told nothing
    prefix, grid = token_layout(vit, "blocks.1")
    stitch = make_stitch(provided, expected, num_prefix_tokens=prefix, token_grid=grid)
    to_map = stitch.pre[0]
    assert isinstance(to_map, TokensToMap) and (to_map.prefix, to_map.grid) == (1, (4, 6))
    assert repr(to_map) == "TokensToMap(drop 1 prefix tokens, grid=4x6)"
    assert _pre_names(stitch) == [T2M, "Upsample"] and stitch.upsample == 8  # 4x6 -> 32x48
    tokens = torch.arange(25.0).view(1, 25, 1).expand(2, 25, 3)  # token i holds the value i
    maps = to_map(tokens)
    assert maps.shape == (2, 3, 4, 6)
    torch.testing.assert_close(maps, torch.arange(1.0, 25.0).view(1, 1, 4, 6).expand(2, 3, 4, 6))
    assert stitch(torch.randn(2, 25, 192)).shape == (2, 4, 32, 48)
    layouts = (token_layout(vit, "blocks.1"), token_layout(resnet, "layer1.0"))  # what stitch() passes
    assert repr(make_stitch(provided, expected, token_layouts=layouts).pre) == repr(stitch.pre)


def test_tokens_to_map_matches_timm_patch_order() -> None:
    """timm flattens the patch map row-major: TokensToMap of the patch tokens is patch_embed.proj's map."""
    from modelstitch.stitches import TokensToMap, token_layout

    vit, x = _rect_vit(), torch.randn(2, 3, 32, 48)
    prefix, grid = token_layout(vit, "patch_embed")
    with torch.no_grad():
        torch.testing.assert_close(TokensToMap(prefix, grid)(vit.patch_embed(x)), vit.patch_embed.proj(x))


@pytest.mark.parametrize(
    ("provided", "expected", "token_grid", "pre", "kernel", "post"),
    [
        ((8, 4, 6), (25, 16), (4, 6), [], 1, M2T),  # the same grid: a 1x1 conv
        ((8, 8, 12), (25, 16), (4, 6), [], 2, M2T),  # 2x downsampling
        ((8, 2, 3), (25, 16), (4, 6), ["Upsample"], 1, M2T),
        ((8, 5, 5), (25, 16), (4, 6), ["Resize"], 1, M2T),
        ((25, 16), (8, 8, 12), (4, 6), [T2M, "Upsample"], 1, ID),
        ((25, 16), (13, 8), ((4, 6), (3, 4)), [TR], 1, ID),  # 1 + 4x6 -> 1 + 3x4
        ((25, 16), (50, 8), ((4, 6), None), [TR], 1, ID),  # -> 1 + 7x7, square
        ((197, 16), (25, 8), (None, (4, 6)), [TR], 1, ID),  # 1 + 14x14, square -> 1 + 4x6
        ((25, 16), (25, 8), ((4, 6), (6, 4)), [TR], 1, ID),  # the same N, another grid
        ((25, 16), (25, 8), (4, 6), [], 1, ID),  # the same grid: no resampling
    ],
)
def test_rectangular_grid_rules(provided, expected, token_grid, pre, kernel, post) -> None:
    stitch = make_stitch(provided, expected, token_grid=token_grid)
    assert (_pre_names(stitch), stitch.kernel, type(stitch.post).__name__) == (pre, kernel, post)
    assert stitch(torch.randn(2, *provided)).shape == (2, *expected)


def test_rectangular_token_resample_is_bilinear_on_the_grid() -> None:
    from modelstitch.stitches import TokenResample, TokensToMap

    stitch = make_stitch((25, 16), (13, 8), token_grid=((4, 6), (3, 4)))
    assert repr(stitch.pre) == "TokenResample(prefix 1 + 4x6 grid -> prefix 1 + 3x4 grid)"
    x = torch.randn(2, 25, 16)
    y = stitch.pre(x)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # equal prefix counts keep the class token
    grid = F.interpolate(TokensToMap(1, (4, 6))(x), size=(3, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[:, 1:], grid.flatten(2).transpose(1, 2))
    torch.testing.assert_close(TokenResample(2, (4, 6), 2, (4, 6))(x[:, :26]), x[:, :26])


@pytest.mark.parametrize(("prefix", "grid"), [(1, (4, 6)), (0, (6, 4)), (2, (1, 5)), (1, 3)])
def test_map_tokens_round_trip(prefix, grid) -> None:
    from modelstitch.stitches import MapToTokens, TokensToMap

    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    to_tokens, to_map = MapToTokens(prefix, grid), TokensToMap(prefix, grid)
    assert f"grid={gh}x{gw}" in repr(to_tokens) and f"grid={gh}x{gw}" in repr(to_map)
    x = torch.randn(2, 5, gh, gw)
    torch.testing.assert_close(to_map(to_tokens(x)), x)
    torch.testing.assert_close(to_tokens.inverse(to_tokens(x)), x)
    tokens = torch.randn(2, prefix + gh * gw, 5)
    torch.testing.assert_close(to_tokens(to_map(tokens))[:, prefix:], tokens[:, prefix:])
    stitch = make_stitch((5, gh, gw), (prefix + gh * gw, 5), num_prefix_tokens=prefix, token_grid=(gh, gw))
    y = stitch(x)
    torch.testing.assert_close(stitch.post(stitch.invert_post(y)), y)


@pytest.mark.parametrize(
    ("layer", "layout"),
    [
        ("blocks.1", (1, (4, 6))),
        ("blocks.0.attn", (1, (4, 6))),
        ("blocks.1:0", (1, (4, 6))),
        ("norm", (1, (4, 6))),
        ("pos_drop", (1, (4, 6))),
        ("norm_pre", (1, (4, 6))),
        ("patch_drop", (1, (4, 6))),
        ("patch_embed", (0, (4, 6))),  # the patch tokens before the class token is prepended
        ("patch_embed.proj", None),  # a [D, 4, 6] map
        ("fc_norm", None),
        ("head", None),
        ("input", None),
    ],
)
def test_token_layout_of_a_timm_vit(layer, layout) -> None:
    from modelstitch.stitches import token_layout

    assert token_layout(_rect_vit(), layer) == layout


def test_token_layout_registers_resnet_and_dynamic_size() -> None:
    from modelstitch.stitches import token_layout
    from modelstitch.zoo import small_resnet

    assert token_layout(_rect_vit(reg_tokens=2, no_embed_class=True), "blocks.0") == (3, (4, 6))
    assert token_layout(small_resnet("R1111", width=4), "layer1.0") is None
    assert token_layout(_rect_vit(dynamic_img_size=True), "blocks.1") is None  # the grid depends on the input


def test_reported_layouts_are_used_only_where_they_fit() -> None:
    layout = (1, (4, 6))
    fits = make_stitch((25, 16), (8, 4, 6), token_layouts=(layout, None))
    assert repr(fits.pre) == "TokensToMap(drop 1 prefix tokens, grid=4x6)"
    guess = repr(make_stitch((24, 16), (8, 4, 4)).pre)  # 24 = 8 + 4x4 by the square guess
    assert repr(make_stitch((24, 16), (8, 4, 4), token_layouts=(layout, None)).pre) == guess  # N != 1 + 24
    assert repr(make_stitch((25, 16), (8, 5, 5), token_layouts=(layout, layout), num_prefix_tokens=0).pre) == (
        "TokensToMap(drop 0 prefix tokens, grid=5x5)"  # an explicit option wins over the report
    )
    assert make_stitch((8, 4, 6), (8, 4, 6), token_layouts=(layout, layout)).post.__class__ is nn.Identity  # maps


@pytest.mark.parametrize(
    ("provided", "expected", "options", "numbers"),
    [
        ((25, 192), (4, 32, 48), {"num_prefix_tokens": 1, "token_grid": (5, 5)}, ["25 tokens", "5x5", "26"]),
        ((25, 192), (4, 32, 48), {"token_grid": (6, 6)}, ["25 tokens", "6x6", "36 patch tokens"]),
        ((25, 192), (4, 32, 48), {"num_prefix_tokens": 1}, ["25 tokens", "24 patch tokens", "token_grid=(gh, gw)"]),
        ((8, 4, 6), (25, 16), {"token_grid": (5, 6)}, ["expected side has 25 tokens", "5x6", "30"]),
        ((25, 16), (25, 8), {"token_grid": ((4, 6), (5, 6))}, ["expected side has 25 tokens", "5x6", "30"]),
        ((25, 192), (4, 32, 48), {"token_grid": (0, 6)}, ["token_grid=(0, 6)", "ints >= 1"]),
        ((25, 192), (4, 32, 48), {"token_grid": (4, 6.0)}, ["token_grid=(4, 6.0)"]),
        ((25, 192), (4, 32, 48), {"token_grid": (True, 24)}, ["token_grid=(True, 24)"]),
        ((25, 192), (4, 32, 48), {"token_grid": (4, 6, 1)}, ["token_grid=(4, 6, 1)"]),
        ((25, 192), (4, 32, 48), {"token_grid": ((4, 6), (4,))}, ["token_grid=((4, 6), (4,))"]),
        ((25, 192), (4, 32, 48), {"token_layouts": (1, (4, 6))}, ["token_layouts=(1, (4, 6))"]),
    ],
)
def test_bad_token_grid_names_the_numbers(provided, expected, options, numbers) -> None:
    message = str(_assert_error(provided, expected, **options))
    for number in numbers:
        assert number in message, (number, message)


def test_equal_token_counts_keep_their_layout_unless_both_grids_are_known() -> None:
    layout = (1, (4, 6))
    assert isinstance(make_stitch((25, 16), (25, 8), token_layouts=(layout, None)).pre, nn.Identity)
    assert isinstance(make_stitch((25, 16), (25, 8), token_layouts=(layout, layout)).pre, nn.Identity)
    other = make_stitch((25, 16), (25, 8), token_layouts=(layout, (1, (6, 4))))
    assert repr(other.pre) == "TokenResample(prefix 1 + 4x6 grid -> prefix 1 + 6x4 grid)"


def test_a_stitch_computes_in_its_own_precision_under_autocast():
    """bfloat16 autocast leaves the stitch in float32: a map with weights of both signs over 512 inputs (the shape
    of a digits ``stem`` -> ``layer4.0`` stitch, whose trained map was off by 635% in bfloat16 and fell from 0.81
    to 0.11 test accuracy) gives exactly its float32 output, from float32 or bfloat16 input alike."""
    torch.manual_seed(0)
    s = make_stitch((8, 32, 32), (64, 4, 4))
    with torch.no_grad():
        s.core.weight.normal_(0.0, 2.0)
    x = torch.relu(torch.randn(4, 8, 32, 32) * 3)
    expected = s(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, from_bf16 = s(x), s(x.bfloat16())
        core_alone = s.core(x)  # what autocast does to the same convolution
    assert got.dtype == from_bf16.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(from_bf16, s(x.bfloat16().float()))
    assert core_alone.dtype == torch.bfloat16
    assert (core_alone.float() - expected).norm() > 1e-3 * expected.norm()
    got.sum().backward()
    assert s.core.weight.grad.dtype == torch.float32
    # a device without autocast (shape inference on meta tensors) still runs
    assert s.to("meta")(torch.zeros(2, 8, 32, 32, device="meta")).shape == (2, 64, 4, 4)
