"""The stitch factory: a small trainable adapter from one layer's output to another's.

A `Stitch` maps the sender's *provided* representation ``[B, *provided]`` to
exactly the receiver's *expected* one ``[B, *expected]``. It is three modules
run in order: ``pre`` (parameter-free layout adapter: pooling, resizing,
token resampling), ``core`` (every trainable parameter) and ``post``
(parameter-free: a reshape, or flattening a map into tokens and prepending
copies of their mean). See ``docs/stitches.md`` for the shape rules.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Reduce
from torch import nn

from .._errors import StitchError
from ..core import ActivationSpec, layout_of
from ._tokens import TokenLayout

__all__ = ["STITCH_KINDS", "Stitch", "identity_", "make_stitch"]

#: Accepted values of ``make_stitch(kind=...)``; ``"auto"`` is ``"linear"``.
STITCH_KINDS: tuple[str, ...] = ("auto", "linear", "bn", "lowrank", "mlp")
_INITS = ("random", "identity")
_POOLS = ("avg", "flatten")
CoreLayout = Literal["map", "tokens", "vector"]
Shape = tuple[int, ...]


class Resize(nn.Module):
    """Bilinear resize ``[B, C, H, W] -> [B, C, *size]`` (``align_corners=False``)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode='bilinear', align_corners=False"


Grid = tuple[int, int]


def _pair(grid: int | Sequence[int]) -> Grid:
    """``g`` -> ``(g, g)``; ``(gh, gw)`` -> ``(gh, gw)``."""
    if isinstance(grid, Sequence):
        gh, gw = grid
        return int(gh), int(gw)
    return int(grid), int(grid)


def _shown(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


class TokenResample(nn.Module):
    """Resample ``[B, p + gh*gw, D]`` tokens to ``[B, p' + gh'*gw', D]``.

    The ``gh*gw`` patch tokens (after the ``p`` leading prefix tokens) are laid
    out row-major as a ``gh x gw`` grid, resized bilinearly to ``gh' x gw'``
    and flattened back. If ``p == p'`` the prefix tokens are kept; otherwise
    each of the ``p'`` output prefix tokens is the mean of the input's patch
    tokens. A grid is ``(gh, gw)``, or one int ``g`` for a square ``g x g``.

    Examples:
        >>> TokenResample(1, (4, 6), 1, 7)(torch.randn(2, 25, 8)).shape
        torch.Size([2, 50, 8])
    """

    def __init__(
        self, prefix_in: int, grid_in: int | tuple[int, int], prefix_out: int, grid_out: int | tuple[int, int]
    ) -> None:
        super().__init__()
        self.prefix_in, self.prefix_out = prefix_in, prefix_out
        self.grid_in, self.grid_out = _pair(grid_in), _pair(grid_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x[:, : self.prefix_in], x[:, self.prefix_in :]
        out = patches
        if self.grid_in != self.grid_out:
            grid = rearrange(patches, "b (h w) d -> b d h w", h=self.grid_in[0], w=self.grid_in[1])
            grid = F.interpolate(grid, size=self.grid_out, mode="bilinear", align_corners=False)
            out = rearrange(grid, "b d h w -> b (h w) d")
        if self.prefix_in != self.prefix_out:
            prefix = patches.mean(dim=1, keepdim=True).expand(-1, self.prefix_out, -1)
        return torch.cat([prefix, out], dim=1)

    def extra_repr(self) -> str:
        return (
            f"prefix {self.prefix_in} + {_shown(self.grid_in)} grid -> "
            f"prefix {self.prefix_out} + {_shown(self.grid_out)} grid"
        )


class TokensToMap(nn.Module):
    """Drop ``p`` prefix tokens and lay out the rest row-major: ``[B, p + gh*gw, D] -> [B, D, gh, gw]``.

    ``grid`` is ``(gh, gw)``, or one int ``g`` for a square ``g x g`` grid.

    Examples:
        >>> TokensToMap(1, (4, 6))(torch.randn(2, 25, 8)).shape
        torch.Size([2, 8, 4, 6])
    """

    def __init__(self, prefix: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        self.prefix, self.grid = prefix, _pair(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x[:, self.prefix :], "b (h w) d -> b d h w", h=self.grid[0], w=self.grid[1])

    def extra_repr(self) -> str:
        return f"drop {self.prefix} prefix tokens, grid={_shown(self.grid)}"


class MapToTokens(nn.Module):
    """Flatten a map into tokens (row-major) and prepend ``p`` prefix tokens equal to their mean.

    ``[B, D, gh, gw] -> [B, p + gh*gw, D]``; `inverse` undoes it (dropping the
    prefix). ``grid`` is ``(gh, gw)``, or one int ``g`` for a square grid.
    """

    def __init__(self, prefix: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        self.prefix, self.grid = prefix, _pair(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = rearrange(x, "b d h w -> b (h w) d")
        prefix = patches.mean(dim=1, keepdim=True).expand(-1, self.prefix, -1)
        return torch.cat([prefix, patches], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, p + gh*gw, D] -> [B, D, gh, gw]``: the patch tokens as a map."""
        return rearrange(y[:, self.prefix :], "b (h w) d -> b d h w", h=self.grid[0], w=self.grid[1])

    def extra_repr(self) -> str:
        return f"grid={_shown(self.grid)}, prepend {self.prefix} mean tokens"


class TokenBatchNorm(nn.BatchNorm1d):
    """`BatchNorm1d` over the last dim of ``[B, N, D]`` tokens (statistics over batch and tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Stitch(nn.Module):
    """A stitch ``[B, *provided] -> [B, *expected]``: ``post(core(pre(x)))``.

    Examples:
        >>> s = make_stitch((197, 192), (256, 8, 8))
        >>> s(torch.randn(2, 197, 192)).shape
        torch.Size([2, 256, 8, 8])
        >>> s.core_layout, s.kernel, type(s.linear).__name__
        ('map', 1, 'Conv2d')

    Build stitches with `make_stitch`. Only ``core`` has parameters; ``pre``
    and ``post`` are fixed reshapes/poolings/resizes.

    Attributes:
        pre: parameter-free, ``[B, *provided]`` to the core's input layout.
        core: all trainable parameters; consumes and produces ``core_layout``
            tensors (``"map"``: ``[B, C, H, W]``, a Conv2d core; ``"tokens"``:
            ``[B, N, D]`` and ``"vector"``: ``[B, D]``, Linear on the last dim).
        post: parameter-free, core output to ``[B, *expected]``: identity,
            `nn.Unflatten` (vector core -> map/tokens) or `MapToTokens`
            (map core -> tokens). `invert_post` undoes it on targets.
        provided: per-sample input shape.
        expected: per-sample output shape.
        kind: ``"linear"``, ``"bn"``, ``"lowrank"`` or ``"mlp"``.
        core_layout: ``"map"``, ``"tokens"`` or ``"vector"``.
        kernel: kernel size (= stride) of the core's first conv; 1 unless it downsamples.
        upsample: the factor of the nearest upsampling that ends ``pre``; 1 if none.
        upsample_after_core: run the core before that upsampling (the same
            function for a pointwise core, cheaper when it does not add
            channels); `make_stitch` sets it.
        input_moments: ``[d, d]`` float32, the second-moment matrix of the
            linear core's input rows (with a column of ones for the bias),
            ``XᵀX`` over the number of rows, as the least-squares pass
            measured it (`LeastSquares`); ``None`` before one. Training
            preconditions the core's gradient with it (``Recipe(precondition=True)``).
            Not part of the state dict.
    """

    def __init__(
        self,
        pre: nn.Module,
        core: nn.Module,
        post: nn.Module,
        *,
        provided: Shape,
        expected: Shape,
        kind: str,
        core_layout: CoreLayout,
        kernel: int = 1,
        upsample_after_core: bool = False,
    ) -> None:
        super().__init__()
        self.pre, self.core, self.post = pre, core, post
        self.provided, self.expected = tuple(provided), tuple(expected)
        self.kind, self.core_layout, self.kernel = kind, core_layout, kernel
        modules = list(pre) if isinstance(pre, nn.Sequential) else [pre]
        last = modules[-1] if modules else None
        factor = getattr(last, "scale_factor", None)
        self.upsample = (
            int(factor)
            if isinstance(last, nn.Upsample)
            and last.mode == "nearest"
            and isinstance(factor, (int, float))
            and float(factor).is_integer()
            else 1
        )
        # pre split at its upsampling, in tuples so that they are not registered as children a second time
        self._early, self._upsampler = (tuple(modules[:-1]), (last,)) if self.upsample > 1 else ((), ())
        if upsample_after_core and self.upsample == 1:
            raise StitchError("upsample_after_core=True needs a pre that ends with a nearest upsampling")
        self.upsample_after_core = upsample_after_core
        self.input_moments: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *provided]`` to ``[B, *expected]``.

        The stitch computes in its parameters' dtype (float32 unless the user
        cast it), outside any active `torch.autocast`: a least-squares map
        sums hundreds of inputs with weights of both signs, and in bfloat16
        the rounding swamps the result (a digits ``stem`` -> ``layer4.0``
        stitch, 512 inputs per output: 635% relative error, test accuracy
        0.81 -> 0.11). The networks around it keep the autocast.
        """
        if tuple(x.shape[1:]) != self.provided:
            raise StitchError(f"stitch {self.provided} -> {self.expected} got input of shape {tuple(x.shape)}")
        dtype = next((t.dtype for t in self.parameters() if t.is_floating_point()), x.dtype)
        with _autocast_off(x.device.type):
            x = x.to(dtype)
            if self.upsample_after_core:  # the same function: nearest upsampling commutes with a pointwise core
                return self.post(self._upsampler[0](self.core(self.before_upsample(x))))
            return self.post(self.core(self.pre(x)))

    def before_upsample(self, x: torch.Tensor) -> torch.Tensor:
        """``pre`` up to its final nearest upsampling (all of ``pre`` when it has none).

        Args:
            x: ``[B, *provided]``.

        Returns:
            ``[B, C, H / upsample, W / upsample]`` for an upsampling ``pre``.
        """
        if self.upsample == 1:
            return self.pre(x)
        for module in self._early:
            x = module(x)
        return x

    @property
    def linear(self) -> nn.Linear | nn.Conv2d | None:
        """The core's single `nn.Linear`/`nn.Conv2d` when ``kind == "linear"``, else ``None``."""
        return self.core if self.kind == "linear" else None

    def invert_post(self, y: torch.Tensor) -> torch.Tensor:
        """Map targets ``[B, *expected]`` back to what ``core`` must output.

        Drops the replicated prefix tokens of `MapToTokens` and undoes reshapes,
        so ``post(invert_post(post(z))) == post(z)``.
        """
        if tuple(y.shape[1:]) != self.expected:
            raise StitchError(f"stitch {self.provided} -> {self.expected} got target of shape {tuple(y.shape)}")
        if isinstance(self.post, MapToTokens):
            return self.post.inverse(y)
        if isinstance(self.post, nn.Unflatten):
            return y.flatten(1)
        return y

    def extra_repr(self) -> str:
        late = ", upsample_after_core=True" if self.upsample_after_core else ""
        return (
            f"{self.provided} -> {self.expected}, kind={self.kind!r}, "
            f"core_layout={self.core_layout!r}, kernel={self.kernel}{late}"
        )


def _spatial(hw: tuple[int, int], hw_out: tuple[int, int]) -> tuple[list[nn.Module], int]:
    """The map->map rule: (pre modules, conv kernel = stride) taking ``hw`` to ``hw_out``."""
    (h, w), (h2, w2) = hw, hw_out
    if (h, w) == (h2, w2):
        return [], 1
    if h % h2 == 0 and w % w2 == 0 and h // h2 == w // w2:
        return [], h // h2
    if h2 % h == 0 and w2 % w == 0 and h2 // h == w2 // w:
        return [nn.Upsample(scale_factor=h2 // h, mode="nearest")], 1
    return [Resize((h2, w2))], 1


def _grid(
    n: int, prefix: int | None, grid: Grid | None, fail: Callable[[str], StitchError], side: str
) -> tuple[int, Grid]:
    """Split ``n`` tokens into (prefix count, (gh, gw)) with ``n == prefix + gh * gw``.

    A known ``grid`` fixes the patch count (and the prefix, ``n - gh * gw``,
    unless ``prefix`` is given too); without one the grid must be square.
    """
    if grid is not None:
        gh, gw = grid
        p = n - gh * gw if prefix is None else prefix
        if p < 0 or p + gh * gw != n:
            made = (
                f"num_prefix_tokens={p} plus token_grid={gh}x{gw} ({gh * gw} patch tokens) make {p + gh * gw}"
                if prefix is not None
                else f"token_grid={gh}x{gw} has {gh * gw} patch tokens, more than {n}"
            )
            raise fail(
                f"the {side} has {n} tokens, but {made}; pass token_grid=(gh, gw) and num_prefix_tokens=p "
                f"with gh*gw + p = {n}"
            )
        return p, (gh, gw)
    p = n - math.isqrt(n) ** 2 if prefix is None else prefix
    g = math.isqrt(max(n - p, 0))
    if p > n or g == 0 or g * g != n - p:
        raise fail(
            f"the {side} has {n} tokens and {p} prefix tokens, so its {n - p} patch tokens do not form a "
            f"square grid; pass token_grid=(gh, gw) with gh*gw = {n - p} for a rectangular patch grid, "
            "num_prefix_tokens=(p_in, p_out) so that N - p is a square, or pool to a vector"
        )
    return p, (g, g)


def _plan(
    src: Shape,
    dst: Shape,
    pool: str,
    prefix: tuple[int | None, int | None],
    grid: tuple[Grid | None, Grid | None],
    fail: Callable[[str], StitchError],
    given_prefix: tuple[int | None, int | None],
) -> tuple[list[nn.Module], CoreLayout, int, int, int, nn.Module]:
    """Per layout pair: (pre modules, core layout, core in, core out, kernel, post).

    ``prefix``/``grid`` merge the options with the reported layouts (already checked against the token
    counts); ``given_prefix`` is ``num_prefix_tokens`` alone.
    """
    a, b = layout_of(src), layout_of(dst)
    if a == "tokens" and b == "tokens":
        (n, d), (n2, d2) = src, dst
        pre: list[nn.Module] = []
        # equal token counts keep their layout unless num_prefix_tokens differs or both grids are known and differ
        regrid = None not in grid and (
            _grid(n, prefix[0], grid[0], fail, "provided side") != _grid(n2, prefix[1], grid[1], fail, "expected side")
        )
        if n != n2 or given_prefix[0] != given_prefix[1] or regrid:
            p, g = _grid(n, prefix[0], grid[0], fail, "provided side")
            p2, g2 = _grid(n2, prefix[1], grid[1], fail, "expected side")
            if (p, g) != (p2, g2):
                pre = [TokenResample(p, g, p2, g2)]
        return pre, "tokens", d, d2, 1, nn.Identity()
    if b == "vector":
        if a == "vector":
            return [], "vector", src[0], dst[0], 1, nn.Identity()
        if pool == "flatten":
            return [nn.Flatten()], "vector", math.prod(src), dst[0], 1, nn.Identity()
        reduce = Reduce("b c h w -> b c", "mean") if a == "map" else Reduce("b n d -> b d", "mean")
        return [reduce], "vector", src[0] if a == "map" else src[1], dst[0], 1, nn.Identity()
    if a == "vector":
        return [], "vector", src[0], math.prod(dst), 1, nn.Unflatten(1, dst)
    if a == "tokens":
        p, hw = _grid(src[0], prefix[0], grid[0], fail, "provided side")
        pre, c_in = [TokensToMap(p, hw)], src[1]
    else:
        pre, c_in, hw = [], src[0], (src[1], src[2])
    if b == "map":
        spatial, k = _spatial(hw, (dst[1], dst[2]))
        return pre + spatial, "map", c_in, dst[0], k, nn.Identity()
    p2, g2 = _grid(dst[0], prefix[1], grid[1], fail, "expected side")
    spatial, k = _spatial(hw, g2)
    return pre + spatial, "map", c_in, dst[1], k, MapToTokens(p2, g2)


def _core(kind: str, layout: CoreLayout, c_in: int, c_out: int, k: int, width: int) -> nn.Module:
    """The trainable core; ``width`` is the rank (lowrank) or hidden width (mlp)."""

    def layer(i: int, o: int, first: bool = True, bias: bool = True) -> nn.Module:
        if layout == "map":
            kk = k if first else 1
            return nn.Conv2d(i, o, kernel_size=kk, stride=kk, bias=bias)
        return nn.Linear(i, o, bias=bias)

    def norm(c: int) -> nn.Module:
        return {"map": nn.BatchNorm2d, "tokens": TokenBatchNorm, "vector": nn.BatchNorm1d}[layout](c)

    if kind == "linear":
        return layer(c_in, c_out)
    if kind == "bn":
        return nn.Sequential(norm(c_in), layer(c_in, c_out), norm(c_out))
    if kind == "lowrank":
        return nn.Sequential(layer(c_in, width, bias=False), layer(width, c_out, first=False))
    return nn.Sequential(layer(c_in, width), nn.ReLU(), layer(width, c_out, first=False))


def _as_shape(x: object) -> Shape | None:
    """The per-sample shape of an `ActivationSpec` or a sequence of ints, else ``None``."""
    if isinstance(x, ActivationSpec):
        return x.shape
    if not isinstance(x, Sequence) or isinstance(x, str) or any(isinstance(s, bool) for s in x):
        return None
    try:
        return tuple(operator.index(s) for s in x)
    except TypeError:
        return None


def _is_count(x: object, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_grid(x: object) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_count(s, 1) for s in x)


def _token_sides(
    src: Shape,
    dst: Shape,
    prefix: tuple[int | None, int | None],
    token_grid: object,
    token_layouts: object,
    fail: Callable[[str], StitchError],
) -> tuple[tuple[int | None, int | None], tuple[Grid | None, Grid | None]]:
    """Validate ``token_grid``/``token_layouts`` and merge them with ``prefix``: (prefixes, grids) per side."""
    if token_grid is None:
        grids: list[Grid | None] = [None, None]
    elif _is_grid(token_grid):
        grids = [_pair(token_grid), _pair(token_grid)]  # type: ignore[arg-type]
    elif (
        isinstance(token_grid, (tuple, list))
        and len(token_grid) == 2
        and all(g is None or _is_grid(g) for g in token_grid)
    ):
        grids = [None if g is None else _pair(g) for g in token_grid]
    else:
        raise fail(
            f"token_grid={token_grid!r} must be None, a pair (gh, gw) of ints >= 1 (both token sides) or a pair "
            "((gh, gw) | None, (gh, gw) | None) (the provided and expected sides)"
        )
    layouts = (None, None) if token_layouts is None else token_layouts

    def is_layout(x: object) -> bool:
        return isinstance(x, (tuple, list)) and len(x) == 2 and _is_count(x[0], 0) and _is_grid(x[1])

    if (
        not isinstance(layouts, (tuple, list))
        or len(layouts) != 2
        or not all(x is None or is_layout(x) for x in layouts)
    ):
        raise fail(
            f"token_layouts={token_layouts!r} must be None or a pair of (p, (gh, gw)) | None for the provided "
            "and expected sides, as `token_layout` returns them"
        )
    prefixes = list(prefix)
    for i, (shape, side) in enumerate(((src, "provided side"), (dst, "expected side"))):
        if layout_of(shape) != "tokens":
            continue
        reported = layouts[i]
        if reported is not None:
            p, g = reported[0], _pair(reported[1])
            if p + g[0] * g[1] == shape[0] and prefixes[i] in (None, p) and grids[i] in (None, g):
                prefixes[i], grids[i] = p, g
        if grids[i] is not None:  # a given grid must fit its side even where no grid is needed
            _grid(shape[0], prefixes[i], grids[i], fail, side)
    return (prefixes[0], prefixes[1]), (grids[0], grids[1])


def make_stitch(
    provided: ActivationSpec | Sequence[int],
    expected: ActivationSpec | Sequence[int],
    *,
    kind: str = "auto",
    init: str = "random",
    rank: int | None = None,
    hidden: int | None = None,
    pool: str = "avg",
    num_prefix_tokens: int | tuple[int | None, int | None] | None = None,
    token_grid: tuple[int, int] | tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None,
    token_layouts: tuple[TokenLayout | None, TokenLayout | None] | None = None,
) -> Stitch:
    """Build a stitch mapping ``[B, *provided]`` to exactly ``[B, *expected]``.

    Examples:
        >>> make_stitch((64, 32, 32), (128, 16, 16))(torch.randn(2, 64, 32, 32)).shape
        torch.Size([2, 128, 16, 16])
        >>> make_stitch((64, 32, 32), (128, 16, 16)).core
        Conv2d(64, 128, kernel_size=(2, 2), stride=(2, 2))
        >>> make_stitch((256, 8, 8), (197, 192))(torch.randn(2, 256, 8, 8)).shape
        torch.Size([2, 197, 192])
        >>> make_stitch((197, 192), (10,), kind="lowrank", rank=4)(torch.randn(2, 197, 192)).shape
        torch.Size([2, 10])
        >>> make_stitch((25, 192), (4, 32, 48), token_grid=(4, 6)).pre  # 1 class token + 4x6 patches
        Sequential(
          (0): TokensToMap(drop 1 prefix tokens, grid=4x6)
          (1): Upsample(scale_factor=8.0, mode='nearest')
        )

    Layouts: ``[D]`` vector, ``[N, D]`` tokens, ``[C, H, W]`` map. Maps are
    matched spatially by a ``k x k`` stride-``k`` conv (integer downsampling),
    nearest upsampling by an integer factor, or a bilinear resize (any other
    ratio). Tokens ``[N, D]`` are ``p`` prefix (class/register) tokens
    followed by a ``gh x gw`` grid of patch tokens (row-major). Unless told
    (``num_prefix_tokens``, ``token_grid``, ``token_layouts``) the grid is
    square and ``p = N - floor(sqrt(N))**2``; given a grid, ``p`` defaults to
    ``N - gh*gw``. A token side is only split when a grid is needed.

    Args:
        provided: the sender layer's `ActivationSpec` or per-sample shape.
        expected: the receiver layer's `ActivationSpec` or per-sample shape.
        kind: ``"auto"``/``"linear"`` (one affine map), ``"bn"`` (BatchNorm,
            linear, BatchNorm), ``"lowrank"`` (rank-``rank`` factorised
            linear map) or ``"mlp"`` (Linear/Conv, ReLU, Linear/Conv).
        init: ``"random"`` (PyTorch default) or ``"identity"`` (linear kind
            with equal channel counts; a ``k x k`` downsampling conv becomes
            per-channel average pooling).
        rank: the rank of a ``"lowrank"`` stitch, ``1 <= rank <= min(in, out)``.
        hidden: hidden width of an ``"mlp"`` stitch (default ``max(in, out)``).
        pool: how a map or tokens become a vector: ``"avg"`` (mean over
            positions/tokens) or ``"flatten"``.
        num_prefix_tokens: prefix tokens of both token sides (an int), or of
            the provided and expected sides (a pair, ``None`` for unknown);
            ignored for non-token sides.
        token_grid: the patch grid ``(gh, gw)`` of both token sides, or a pair
            ``((gh, gw) | None, (gh, gw) | None)`` for the provided and
            expected sides; ignored for non-token sides. A given grid must
            fit its side: ``gh*gw + p == N``.
        token_layouts: what the networks report, ``(p, (gh, gw)) | None`` for
            the provided and expected sides (see `token_layout`; `stitch`
            passes them). Unlike the two options above, a reported layout is
            only a hint: it is used for a side that is ``[N, D]`` tokens with
            ``N == p + gh*gw`` and that agrees with ``num_prefix_tokens`` and
            ``token_grid`` where those are given; otherwise it is ignored.

    Returns:
        The `Stitch`, with PyTorch's default dtype and on the CPU.

    Raises:
        StitchError: the pair of shapes or an option is not supported; the
            message names both shapes and what to do instead.
    """
    src, dst = _as_shape(provided), _as_shape(expected)

    def fail(message: str) -> StitchError:
        shown = [
            f"{getattr(x, 'name', '')} {shape}".strip() if shape is not None else repr(x)
            for x, shape in ((provided, src), (expected, dst))
        ]
        return StitchError(f"cannot stitch provided {shown[0]} -> expected {shown[1]}: {message}")

    if src is None or dst is None or layout_of(src) is None or layout_of(dst) is None:
        raise fail(
            "shapes must be per-sample (no batch dim) [D] vectors, [N, D] tokens or [C, H, W] maps; "
            "flatten or pool the activation, or stitch at a different layer"
        )
    if min(src + dst) < 1:
        raise fail("every size must be >= 1; pick layers with non-empty outputs")
    if kind not in STITCH_KINDS:
        raise fail(f"unknown kind={kind!r}; use one of {', '.join(map(repr, STITCH_KINDS))}")
    kind = "linear" if kind == "auto" else kind
    if init not in _INITS:
        raise fail(
            f"unknown init={init!r}; make_stitch supports 'random' and 'identity', and least squares is "
            "available as stitch(..., init='lstsq', init_data=...)"
        )
    if pool not in _POOLS:
        raise fail(f"unknown pool={pool!r}; use 'avg' or 'flatten'")
    if rank is not None and kind != "lowrank":
        raise fail(f"rank={rank!r} only applies to kind='lowrank' (kind is {kind!r}); drop rank or use kind='lowrank'")
    if hidden is not None and kind != "mlp":
        raise fail(f"hidden={hidden!r} only applies to kind='mlp' (kind is {kind!r}); drop hidden or use kind='mlp'")
    if hidden is not None and not _is_count(hidden, 1):
        raise fail(f"hidden={hidden!r} must be an int >= 1")
    prefix = num_prefix_tokens if isinstance(num_prefix_tokens, (tuple, list)) else (num_prefix_tokens,) * 2
    if len(prefix) != 2 or not all(p is None or _is_count(p, 0) for p in prefix):
        raise fail(f"num_prefix_tokens={num_prefix_tokens!r} must be None, an int >= 0 or a pair (p_in, p_out)")
    prefixes, grids = _token_sides(src, dst, (prefix[0], prefix[1]), token_grid, token_layouts, fail)

    pre, layout, c_in, c_out, k, post = _plan(src, dst, pool, prefixes, grids, fail, (prefix[0], prefix[1]))
    width = max(c_in, c_out) if hidden is None else hidden
    if kind == "lowrank":
        if not _is_count(rank, 1) or rank > min(c_in, c_out):
            raise fail(
                f"kind='lowrank' needs rank=r with 1 <= r <= min({c_in}, {c_out}) = {min(c_in, c_out)} "
                f"(got rank={rank!r}); pick a rank in that range or use kind='linear'"
            )
        width = rank
    instead = "use init='random', or least squares through stitch(..., init='lstsq', init_data=...)"
    if init == "identity" and kind != "linear":
        raise fail(f"init='identity' is only defined for kind='linear' (got kind={kind!r}); {instead}")
    if init == "identity" and c_in != c_out:
        raise fail(f"init='identity' needs equal channel counts, but the core maps {c_in} -> {c_out}; {instead}")
    core = _core(kind, layout, c_in, c_out, k, width)
    pre_module = nn.Identity() if not pre else pre[0] if len(pre) == 1 else nn.Sequential(*pre)
    # a nearest upsampling commutes with a pointwise core (1x1 convs, ReLU; not BatchNorm, whose running
    # statistics count pixels): run it after the core when that upsamples fewer channels
    late = bool(pre) and isinstance(pre[-1], nn.Upsample) and kind != "bn" and c_out <= c_in
    stitch = Stitch(
        pre_module, core, post, provided=src, expected=dst, kind=kind, core_layout=layout, kernel=k,
        upsample_after_core=late,
    )  # fmt: skip
    if init == "identity":
        identity_(stitch)
    return stitch


def identity_(stitch: nn.Module) -> bool:
    """Set a linear stitch's core to the identity map, in place, where its shapes allow it.

    The core's weight becomes the identity on channels (divided by ``k²`` for a
    ``k x k`` stride-``k`` convolution, which then averages each patch), its
    bias zero.

    Args:
        stitch: a `Stitch`.

    Returns:
        Whether the core was set: ``False`` for a stitch that is not linear, or
        whose core maps a different number of channels in than out.

    Examples:
        >>> from modelstitch.stitches import make_stitch
        >>> s = make_stitch((4, 8, 8), (4, 8, 8))
        >>> identity_(s), bool(torch.allclose(s(torch.ones(1, 4, 8, 8)), torch.ones(1, 4, 8, 8)))
        (True, True)
    """
    core = getattr(stitch, "linear", None)
    if core is None:
        return False
    c_out, c_in = core.weight.shape[:2]
    if c_in != c_out:
        return False
    k = core.weight.shape[-1] if core.weight.dim() == 4 else 1
    with torch.no_grad():
        core.weight.zero_()
        if core.bias is not None:
            core.bias.zero_()
        index = torch.arange(c_in)
        core.weight[index, index] = 1.0 / (k * k)
    return True


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Leave an active `torch.autocast` of ``device_type`` for the block (nothing where none is active, or where
    the device has no autocast, such as ``meta``)."""
    try:
        active = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False) if active else contextlib.nullcontext()
