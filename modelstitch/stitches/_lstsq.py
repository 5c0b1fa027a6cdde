"""Least-squares initialisation of a linear stitch, from streamed sufficient statistics."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._errors import StitchError
from ..core import BatchFn, Positions, as_loader, iterate_batches, position_mask, prefix_outputs, resolve_device
from ._modules import Stitch

if TYPE_CHECKING:
    from ._stitched import StitchedModel

__all__ = ["JointLeastSquares", "LeastSquares", "fit_least_squares", "fit_least_squares_all"]


class LeastSquares:
    """Streaming ridge regression ``Y ≈ X W + b`` for one stitch's linear core.

    Accumulates ``XᵀX`` and ``XᵀY`` over batches of (provided, expected)
    pairs and solves once, so the result is the least-squares fit over all
    samples (no averaging of per-batch solutions). Each batch's products are
    float32 matrix products at full float32 precision (never TF32 or bf16,
    whatever `torch.set_float32_matmul_precision` says), summed over batches
    in float64; float64 inputs stay float64. Against an all-float64 fit
    (``benchmarks/bench_lstsq.py``, docs/performance.md): the fitted
    stitches' outputs differed by at most 1.3e-3 (relative) on the quick
    preset's 30 cells and 1e-5 on cifar-small's, where every start kept its
    test accuracy, in 0.36 of the time on a 2-core CPU; in an
    ill-conditioned system (an 8x8 stride-8 core with 1,024 inputs) the
    weights move more, by up to 1e-2. Exact for
    ``1x1`` convolutions and ``Linear`` layers, and for ``k x k`` stride-``k``
    convolutions, whose patches do not overlap.

    Examples:
        >>> from modelstitch.stitches import make_stitch
        >>> s = make_stitch((4, 8, 8), (3, 4, 4))
        >>> true = torch.nn.Conv2d(4, 3, 2, stride=2)
        >>> fit = LeastSquares(s)
        >>> x = torch.randn(16, 4, 8, 8)
        >>> fit.update(x, true(x).detach())
        >>> fit.solve(ridge=0.0)
        >>> torch.allclose(s(x), true(x), atol=1e-4)
        True
    """

    def __init__(self, stitch: Stitch) -> None:
        if stitch.linear is None:
            raise StitchError(
                f"least-squares init needs a stitch of kind 'linear' (got kind={stitch.kind!r}); "
                "use init='random' for other kinds"
            )
        self.stitch = stitch
        self.layer = stitch.linear
        self.bias = self.layer.bias is not None
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.rows = 0

    def design(self, provided: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of inputs ``[R, d_in]`` (with a column of ones for the bias) and targets ``[R, d_out]`` for the
        core's linear layer: what `update` adds to the normal equations.

        A 1x1 conv core after a nearest upsampling by ``f`` sees each input
        pixel ``f x f`` times; its rows here are the pixels before the
        upsampling, with targets average-pooled over each ``f x f`` block. That
        gives the same normal equations divided by ``f²`` (`update` multiplies
        them back), for ``f²`` times fewer rows.
        """
        dtype = _common_dtype(provided, expected)
        x = self._inputs(provided, dtype, maps=False)
        y = self._targets(expected, dtype, like=x)
        if self.bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return x, y

    def _inputs(self, provided: torch.Tensor, dtype: torch.dtype, *, maps: bool = True) -> torch.Tensor:
        """The core's inputs in ``dtype``: rows ``[R, d_in]``, or a map ``[B, d_in, P]`` (``P`` positions per
        sample) for a conv core with ``d_in <= 2 P`` (where ``maps``), which `update` multiplies sample by
        sample (`_input_products`) instead of copying it into rows: on 2 CPU threads, a batch of 256 CIFAR-10
        ``stem`` maps (16 channels, 32x32) took 2.8 ms as a map against 6.5 as rows for a 1x1 core, and 7.7
        against 18.5 in 2x2 patches (copying patches into rows was 13 of those); with ``d_in`` much larger
        than ``P`` the per-sample products ``[B, d_in, d_in]`` cost more (8x8 patches: 418 ms against 29)."""
        with torch.no_grad():
            x = self.stitch.before_upsample(provided).to(dtype)
        if not isinstance(self.layer, nn.Conv2d):
            return x.reshape(-1, x.shape[-1])
        k = self.stitch.kernel
        b, c, h, w = x.shape
        h, w = h // k, w // k
        x = x[:, :, : h * k, : w * k]
        # each position's inputs (k x k patches do not overlap) in the weight's (channel, row, column) order
        if maps and c * k * k <= 2 * h * w:
            return x.reshape(b, c, h, k, w, k).permute(0, 1, 3, 5, 2, 4).reshape(b, c * k * k, h * w)
        return x.reshape(b, c, h, k, w, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * k * k)

    def _targets(self, expected: torch.Tensor, dtype: torch.dtype, *, like: torch.Tensor) -> torch.Tensor:
        """What the core must output, in ``dtype`` and in the layout of its inputs ``like`` (`_inputs`): rows
        ``[R, d_out]`` or a map ``[B, D, P]``."""
        f = self.stitch.upsample
        with torch.no_grad():
            y = self.stitch.invert_post(expected)
            if f > 1:
                y = F.avg_pool2d(y, f)
        if not isinstance(self.layer, nn.Conv2d):
            return y.reshape(-1, y.shape[-1]).to(dtype)
        if like.dim() == 3:
            return y.reshape(y.shape[0], y.shape[1], -1).to(dtype)
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).to(dtype)

    def update(self, provided: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``provided`` ``[B, *stitch.provided]``, ``expected`` ``[B, *stitch.expected]``.

        ``mask`` ``[B, T]`` (bool, see `position_mask`) keeps only those positions' rows of a
        tokens-to-tokens stitch whose core sees the positions one to one.
        """
        dtype = _common_dtype(provided, expected)
        x = self._inputs(provided, dtype)
        y = self._targets(expected, dtype, like=x)
        if mask is not None and self.stitch.core_layout == "tokens" and x.shape[0] == y.shape[0] == mask.numel():
            keep = mask.reshape(-1).to(x.device)
            x, y = x[keep], y[keep]
        self._add(x, y, _input_products(x))

    def _add(self, x: torch.Tensor, y: torch.Tensor, products: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        """Add inputs ``x`` and targets ``y`` (`_inputs`, `_targets`) to the normal equations, given the
        inputs' own products ``(XᵀX, column sums, rows)`` (`_input_products`: cells that read the same inputs
        compute them once)."""
        gram, sums, rows = products
        with _full_float32():
            if x.dim() == 3:  # maps [B, d, P] and [B, d_out, P]
                xty, y_sums = torch.bmm(x, y.transpose(1, 2)).sum(0), y.sum((0, 2))
            else:
                xty, y_sums = x.T @ y, y.sum(0)
        repeats = self.stitch.upsample**2  # each row of an upsampled input stands for f² rows
        d = gram.shape[0]
        if self.xtx is None:
            self.xtx = torch.zeros(d + self.bias, d + self.bias, dtype=torch.float64, device=x.device)
            self.xty = torch.zeros(d + self.bias, xty.shape[1], dtype=torch.float64, device=x.device)
        self.xtx[:d, :d].add_(gram, alpha=repeats)
        self.xty[:d].add_(xty, alpha=repeats)
        if self.bias:  # the column of ones: XᵀX's last row and column, Xᵀy's last row (column sums)
            self.xtx[:d, d].add_(sums, alpha=repeats)
            self.xtx[d, :d].add_(sums, alpha=repeats)
            self.xtx[d, d] += rows * repeats
            self.xty[d].add_(y_sums, alpha=repeats)
        self.rows += rows * repeats

    def record_moments(self) -> None:
        """Store ``XᵀX / rows`` on the stitch as its `Stitch.input_moments` (what preconditioned training uses)."""
        if self.xtx is None or self.rows == 0:
            raise StitchError("least-squares init saw no data; pass init_data with at least one batch")
        self.stitch.input_moments = (self.xtx / self.rows).float()

    def solve(self, ridge: float = 1e-4) -> None:
        """Solve the ridge system and write the weights into the stitch's linear layer.

        Also records the input's second moments on the stitch (`record_moments`).

        Args:
            ridge: penalty relative to the mean diagonal of ``XᵀX`` (the bias is
                not penalised); keeps the system well posed when features are
                collinear.
        """
        if self.xtx is None or self.xty is None:
            raise StitchError("least-squares init saw no data; pass init_data with at least one batch")
        a = self.xtx.clone()
        d = a.shape[0] - int(self.bias)
        a[range(d), range(d)] += ridge * a.diagonal()[:d].mean().clamp_min(1e-12)
        if not (torch.isfinite(a).all() and torch.isfinite(self.xty).all()):
            raise StitchError("least-squares init saw NaN or infinite activations; check the data and the networks")
        w = torch.linalg.lstsq(a, self.xty).solution if ridge == 0 else torch.linalg.solve(a, self.xty)
        if not torch.isfinite(w).all():
            raise StitchError(
                f"least squares with ridge={ridge} gave non-finite weights (the provided features are collinear); "
                "use a ridge > 0, e.g. the default 1e-4"
            )
        weight, bias = w[:d].T, (w[d] if self.bias else None)
        self.record_moments()
        with torch.no_grad():
            self.layer.weight.copy_(weight.reshape(self.layer.weight.shape).to(self.layer.weight))
            if bias is not None:
                self.layer.bias.copy_(bias.to(self.layer.bias))


_GRAM_BLOCKS = 4
"""`_gram` computes the blocks on and above the diagonal of this many column blocks (10 of 16: 5/8 of the work)."""


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` ``[d, d]`` of rows ``x`` ``[R, d]``, its lower blocks copied from the upper ones (it is symmetric).

    For ``d`` of 256 or more (a strided stitch's patches: 1,024 inputs for 8x8 patches of 16 channels) the
    products are most of a least-squares pass; below that one product is as fast.
    """
    d = x.shape[1]
    if d < 256:
        return x.T @ x
    edges = [d * i // _GRAM_BLOCKS for i in range(_GRAM_BLOCKS + 1)]
    gram = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start, end in itertools.pairwise(edges):
        block = x[:, start:end].T @ x[:, start:]  # rows start:end, columns start: (on and right of the diagonal)
        gram[start:end, start:] = block
        gram[start:, start:end] = block.T
    return gram


def _input_products(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(XᵀX [d, d], column sums [d], rows)`` of inputs ``x``: rows ``[R, d]`` or a map ``[B, d, P]``.

    Column sums are float32 cascade sums, as accurate as the products at a tenth of float64's cost.
    """
    with _full_float32():
        if x.dim() == 3:
            return torch.bmm(x, x.transpose(1, 2)).sum(0), x.sum((0, 2)), x.shape[0] * x.shape[2]
        return _gram(x), x.sum(0), x.shape[0]


def _common_dtype(provided: torch.Tensor, expected: torch.Tensor) -> torch.dtype:
    """One dtype for inputs and targets: bf16 and half rise to float32, and float64 in either stays float64."""
    return torch.promote_types(torch.promote_types(provided.dtype, expected.dtype), torch.float32)


def _shared_inputs(m: StitchedModel) -> tuple[str, int] | None:
    """A key that cells whose cores read the same inputs share, or ``None``: a conv core of one kernel on one
    sender layer, behind a ``pre`` that is nothing or only the final nearest upsampling (which the fit sees
    past: `LeastSquares._inputs`). Other ``pre`` modules are not compared."""
    s = m.stitch
    if not isinstance(s.linear, nn.Conv2d):
        return None
    if not (isinstance(s.pre, nn.Identity) or (s.upsample > 1 and isinstance(s.pre, nn.Upsample))):
        return None
    return m.sender_prefix.key, s.kernel


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Float32 matrix products at full precision inside (no TF32 on CUDA, no bf16 on the CPU), then as before."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fit_least_squares(
    stitched: StitchedModel,
    data: Any,
    *,
    ridge: float = 1e-4,
    batch_fn: BatchFn | None = None,
    batch_size: int = 256,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> int:
    """Initialise ``stitched.stitch`` to the least-squares map from provided to expected representation.

    Streams ``data`` once through both frozen networks, accumulating the
    normal equations (see `LeastSquares`).

    Args:
        stitched: a `StitchedModel` whose stitch has kind ``"linear"``.
        data: Dataset or DataLoader of inputs (labels are ignored).
        ridge: relative ridge penalty, see `LeastSquares.solve`.
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        batch_size: batch size when ``data`` is a Dataset.
        max_batches: stop after this many batches.
        device: where to run; ``None`` keeps the stitched model's device.
        progress: show a progress bar.

    Returns:
        The number of regression rows used (samples times positions).

    Raises:
        StitchError: the stitch is not linear, or the data or activations are not finite.
    """
    LeastSquares(stitched.stitch)  # refuses a stitch that is not linear, before any data is read
    dev = next(stitched.stitch.parameters()).device if device is None else device
    return fit_least_squares_all(
        [stitched],
        data,
        ridge=ridge,
        batch_fn=batch_fn,
        batch_size=batch_size,
        max_batches=max_batches,
        device=dev,
        progress=progress,
    )


@torch.no_grad()
def fit_least_squares_all(
    models: Sequence[StitchedModel],
    data: Any,
    *,
    ridge: float = 1e-4,
    batch_fn: BatchFn | None = None,
    batch_size: int = 256,
    max_batches: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    what: str = "the least-squares data",
    positions: Positions | None = None,
) -> int:
    """Set every linear stitch to its least-squares map, streaming ``data`` once for all of them.

    `fit_least_squares` for many cells at once: each batch runs every sender
    and receiver once for all the layers the cells need (`prefix_outputs`, as
    training does), and each stitch accumulates its own normal equations
    (`LeastSquares`). Stitches of other kinds are left as they are.

    Args:
        models: stitched models, e.g. every cell of a pair.
        data: Dataset, DataLoader or iterable of batches (labels are ignored).
        ridge: relative ridge penalty (see `LeastSquares.solve`).
        batch_fn: maps a loader batch to ``(inputs, labels)``.
        batch_size: batch size when ``data`` is a Dataset.
        max_batches: stop after this many batches.
        device: where to run.
        progress: show a progress bar.
        what: names the data in errors.
        positions: which token positions enter the fit besides unpadded
            ones (see `Positions`); padding never does.

    Returns:
        The number of regression rows of the first fitted stitch (0 if none is linear).
    """
    fit = JointLeastSquares(models, device, positions)
    if not fit.fits:
        return 0
    loader = as_loader(data, batch_size=batch_size, shuffle=False, what="least-squares data")
    batches = iterate_batches(loader, fit.device, batch_fn, what=what)
    with contextlib.ExitStack() as stack:
        for m in fit.linear:
            stack.enter_context(m.frozen())
        for i, (x, _) in enumerate(tqdm(batches, desc="lstsq", disable=not progress, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            fit.update(x)
    return fit.solve(ridge)


class JointLeastSquares:
    """The least-squares pass of `fit_least_squares_all`, fed one batch at a time.

    Each batch runs every sender and receiver once for all the layers the
    cells need (`prefix_outputs`), and each linear stitch adds the batch to
    its own normal equations (`LeastSquares`). A pass over the data made for
    another reason can feed it: `train_stitches` fills its activation cache
    and fits the starts in the same pass, handing over the senders'
    activations it computed. Cells whose cores read the same inputs (conv
    cores of one kernel on one sender layer, behind nothing or a nearest
    upsampling) compute the inputs' rows and Gram matrix once per batch for
    all of them; each fit is the one the cell would get alone.

    Args:
        models: stitched models; stitches of other kinds than linear are left out.
        device: where to run (the models are moved there).
        positions: which token positions enter the fit besides unpadded
            ones (see `Positions`).

    Attributes:
        groups: indices into the linear cells, one list per set of cells
            that share their inputs' products (one cell alone where none do).
    """

    def __init__(
        self, models: Sequence[StitchedModel], device: str | torch.device | None, positions: Positions | None = None
    ) -> None:
        self.linear = [m for m in models if m.stitch.linear is not None]
        self.device = resolve_device(device)
        for m in self.linear:
            m.to(self.device)
        self.fits = [LeastSquares(m.stitch) for m in self.linear]
        self.senders = list({m.sender_prefix.key: m.sender_prefix for m in self.linear}.values())
        self.receivers = list({m.receiver_prefix.key: m.receiver_prefix for m in self.linear}.values())
        self.positions = positions
        groups: dict[Any, list[int]] = {}  # cells whose cores read the same inputs: one XᵀX per batch for them all
        for i, m in enumerate(self.linear):
            groups.setdefault(_shared_inputs(m) or i, []).append(i)
        self.groups = list(groups.values())

    @torch.no_grad()
    def update(self, x: Any, provided: dict[str, torch.Tensor] | None = None) -> None:
        """Add one batch of inputs ``x``.

        Args:
            x: a batch of inputs, on `device`.
            provided: activations of ``x`` keyed by prefix key
                (`prefix_outputs`), where the caller has them: the senders',
                and any receiver layer's among them (a self-pair's, or the
                "mse" objective's targets) serves as a target too; computed
                here otherwise. They must be those of the numerics the fit
                wants (no autocast): the receivers' targets always are.
        """
        if provided is None:
            reps, targets = prefix_outputs(self.senders, x), self.receivers
        else:
            reps = dict(provided)
            targets = [p for p in self.receivers if p.key not in reps]
        if targets:
            with torch.autocast(device_type=self.device.type, enabled=False):  # targets in full precision
                reps.update(prefix_outputs(targets, x))
        for group in self.groups:
            if len(group) == 1:
                m = self.linear[group[0]]
                given, expected = reps[m.sender_prefix.key].float(), reps[m.receiver_prefix.key].float()
                self.fits[group[0]].update(given, expected, position_mask(x, [expected, given], self.positions))
                continue
            # conv cores on one sender layer's map: its rows and their products once (no position mask applies)
            first = self.fits[group[0]]
            inputs = first._inputs(reps[self.linear[group[0]].sender_prefix.key].float(), torch.float32)
            products = _input_products(inputs)
            for i in group:
                expected = reps[self.linear[i].receiver_prefix.key].float()
                self.fits[i]._add(inputs, self.fits[i]._targets(expected, torch.float32, like=inputs), products)

    def solve(self, ridge: float = 1e-4) -> int:
        """Solve every stitch's system (`LeastSquares.solve`) and mark it started (``init="lstsq"``).

        Returns:
            The number of regression rows of the first stitch (0 if none is linear).
        """
        for fit, m in zip(self.fits, self.linear):
            fit.solve(ridge)
            m.init = "lstsq"  # fitted: a later train_stitch starts from here
        return self.fits[0].rows if self.fits else 0
