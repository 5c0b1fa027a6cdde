"""`StitchedModel` and `stitch`: sender prefix -> stitch -> receiver suffix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._errors import StitchError, first_line
from ..core import (
    ActivationSpec,
    Address,
    OutputSelector,
    Prefix,
    Suffix,
    SuffixMethod,
    frozen,
    layer_specs,
    match_dtype,
    parse_address,
    suffix,
    to_device,
)
from ._lstsq import fit_least_squares
from ._modules import Stitch, make_stitch
from ._tokens import token_layout

__all__ = ["StitchedModel", "assemble", "stitch"]


class StitchedModel(nn.Module):
    """A frozen sender up to one layer, a trainable stitch, a frozen receiver after one layer.

    ``stitched(x)`` computes ``receiver_after_j(stitch(sender_upto_i(x)))``.
    Only ``stitch`` is trainable. During every call the sender and receiver
    run in eval mode with ``requires_grad=False`` and their modes and flags are
    put back afterwards, so ``stitched.train()`` trains the stitch alone, no
    weight gradient is ever computed for the two networks and their
    parameters and buffers (BatchNorm statistics included) never change.

    Attributes:
        sender: the network that provides the representation.
        receiver: the network that consumes it.
        stitch: the trainable `Stitch`.
        provided: `ActivationSpec` of the sender's layer output.
        expected: `ActivationSpec` of the receiver's layer output.
        sender_prefix: `Prefix` of the sender (stops after the sender layer).
        receiver_prefix: `Prefix` of the receiver (gives the expected representation).
        receiver_suffix: `Suffix` of the receiver (``method`` says how it runs).
        init: how the stitch started: ``"random"``, ``"identity"`` or
            ``"lstsq"``; ``"auto"`` until `train_stitch` starts it as its
            recipe says (``Recipe.init``).
    """

    def __init__(
        self,
        sender: nn.Module,
        receiver: nn.Module,
        stitch: Stitch,
        *,
        provided: ActivationSpec,
        expected: ActivationSpec,
        sender_prefix: Prefix,
        receiver_prefix: Prefix,
        receiver_suffix: Suffix,
        init: str = "random",
    ) -> None:
        super().__init__()
        self.sender = sender
        self.receiver = receiver
        self.stitch = stitch
        self.provided = provided
        self.expected = expected
        self.sender_prefix = sender_prefix
        self.receiver_prefix = receiver_prefix
        self.receiver_suffix = receiver_suffix
        self.init = init
        self._frozen_depth = 0

    @property
    def sender_layer(self) -> str:
        """The sender layer's address."""
        return self.provided.name

    @property
    def receiver_layer(self) -> str:
        """The receiver layer's address."""
        return self.expected.name

    def train(self, mode: bool = True) -> StitchedModel:
        """Set the stitch's mode; the sender and receiver always run in eval mode."""
        self.training = mode
        self.stitch.train(mode)
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The stitch's parameters: the only ones an optimiser should see."""
        return self.stitch.parameters()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[StitchedModel]:
        """Hold the sender and receiver frozen (eval, no ``requires_grad``) across many calls.

        Every forward does this by itself; a training loop that wraps its
        steps in this block saves the per-call bookkeeping. Modes and flags
        are restored on exit, also on exceptions.
        """
        if self._frozen_depth:
            self._frozen_depth += 1
            try:
                yield self
            finally:
                self._frozen_depth -= 1
            return
        with frozen(self.sender, self.receiver):
            self._frozen_depth = 1
            try:
                yield self
            finally:
                self._frozen_depth = 0

    def provided_representation(self, x: Any) -> torch.Tensor:
        """The sender's layer output ``A<=i(x)``, ``[B, *provided.shape]``, without gradient."""
        with self.frozen(), torch.no_grad():
            return self.sender_prefix(x)

    def expected_representation(self, x: Any) -> torch.Tensor:
        """The receiver's own layer output ``B<=j(x)``, ``[B, *expected.shape]``, without gradient."""
        with self.frozen(), torch.no_grad():
            return self.receiver_prefix(x)

    @property
    def cell(self) -> str:
        """The cell in words, for messages: ``"SmallResNet['layer1.0'] -> SmallResNet['stem']"``."""
        return (
            f"{type(self.sender).__name__}[{self.sender_layer!r}] -> {type(self.receiver).__name__}"
            f"[{self.receiver_layer!r}]"
        )

    def adapt(self, provided: torch.Tensor) -> torch.Tensor:
        """Apply the stitch: ``[B, *provided.shape]`` to ``[B, *expected.shape]``.

        The provided representation is cast to the stitch's dtype and the
        result to the receiver's, so networks of different precisions (an
        fp16 sender, an fp32 receiver) stitch as they are.
        """
        return match_dtype(self.stitch(match_dtype(provided, self.stitch)), self.receiver)

    def forward_from(self, provided: torch.Tensor, x: Any = None) -> Any:
        """Stitch and run the receiver from a given provided representation.

        Args:
            provided: the sender's layer output, ``[B, *provided.shape]`` (e.g.
                from an activation cache).
            x: the original input; needed only when
                ``receiver_suffix.needs_input`` (the hook fallback).

        Returns:
            The receiver's output, e.g. logits ``[B, num_classes]``.

        Raises:
            StitchError: the receiver failed on the stitch's output (a shape,
                dtype or device mismatch); the message names the cell.
        """
        with self.frozen(), self.errors_named():
            return self.receiver_suffix(self.adapt(provided), x)

    def forward(self, x: Any) -> Any:
        """Run sender prefix, stitch and receiver suffix on input ``x`` (``[B, ...]``)."""
        with self.frozen(), self.errors_named():
            return self.forward_from(self.provided_representation(x), x)

    @contextlib.contextmanager
    def errors_named(self) -> Iterator[None]:
        """Re-raise a `RuntimeError` from inside the networks as a `StitchError` naming this cell.

        Out-of-memory errors pass through unchanged (callers retry them).
        """
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            raise StitchError(
                f"cell {self.cell} failed: {first_line(err)} (sender layer gives {self.provided.shape} "
                f"{self.provided.dtype}; receiver layer expects {self.expected.shape} {self.expected.dtype}; "
                f"the stitch is {self.stitch.provided} -> {self.stitch.expected})"
            ) from err

    def extra_repr(self) -> str:
        return (
            f"sender={type(self.sender).__name__}[{self.sender_layer!r}] {self.provided.shape} -> "
            f"receiver={type(self.receiver).__name__}[{self.receiver_layer!r}] {self.expected.shape}, "
            f"suffix={self.receiver_suffix.method!r}"
        )


def stitch(
    sender: nn.Module,
    sender_layer: str,
    receiver: nn.Module,
    receiver_layer: str,
    *,
    example_input: Any,
    kind: str = "auto",
    init: str = "auto",
    init_data: Any = None,
    sender_output: OutputSelector = None,
    receiver_output: OutputSelector = None,
    suffix_method: SuffixMethod = "auto",
    **stitch_options: Any,
) -> StitchedModel:
    """Stitch ``sender`` at ``sender_layer`` into ``receiver`` at ``receiver_layer``.

    One probe forward of each network on ``example_input`` (eval mode, no
    gradients, nothing changed) gives the two layers' shapes; `make_stitch`
    builds the stitch from them; the receiver is cut after its layer (see
    `suffix`). The stitch is created on the sender's device, in the dtype of the sender layer's output.

    Args:
        sender: the network whose representation is provided (frozen).
        sender_layer: its layer address (see `list_layers`).
        receiver: the network that consumes the representation (frozen).
        receiver_layer: the layer whose output the stitch replaces;
            ``"input"`` makes the stitch generate the receiver's input.
        example_input: a batch like the real data, e.g.
            ``torch.randn(2, 3, 32, 32)``; both networks must accept it.
        kind: the stitch kind, see `make_stitch`.
        init: ``"auto"`` (default): the stitch starts as the recipe of its
            first `train_stitch` says (``Recipe.init``: least squares on the
            training part for a linear stitch with the default ``Recipe()``,
            random with ``Recipe.paper()``), and is random until then.
            ``"random"`` or ``"identity"`` (see `make_stitch`), or
            ``"lstsq"``: the closed-form least-squares map from provided to
            expected representation over ``init_data`` (see
            `fit_least_squares`; kind ``"linear"`` only), fix the start now;
            training then starts from it whatever the recipe says.
        init_data: a Dataset or DataLoader of inputs, for ``init="lstsq"``.
        sender_output: tensor selector for a structured sender-layer output.
        receiver_output: tensor selector for a structured receiver-layer output.
        suffix_method: ``"auto"``, ``"graph"`` or ``"hook"``, see `suffix`.
        **stitch_options: passed to `make_stitch` (``rank``, ``hidden``,
            ``pool``, ``num_prefix_tokens``, ``token_grid``). The token
            layout the networks report (`token_layout`: a timm ViT's prefix
            tokens and patch grid, rectangular ones included) is used unless
            these say otherwise.

    Returns:
        A `StitchedModel`: ``[B, ...] -> receiver output``.

    Raises:
        StitchError: an unknown layer, a module that runs several times
            addressed without ``":k"``, or shapes no stitch kind can map.

    Examples:
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 2, stride=2))
        >>> b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        >>> s = stitch(a, "2", b, "1", example_input=torch.randn(2, 3, 8, 8))
        >>> s(torch.randn(5, 3, 8, 8)).shape
        torch.Size([5, 10])
        >>> s.stitch
        Stitch(
          (16, 4, 4) -> (4, 8, 8), kind='linear', core_layout='map', kernel=1, upsample_after_core=True
          (pre): Upsample(scale_factor=2.0, mode='nearest')
          (core): Conv2d(16, 4, kernel_size=(1, 1), stride=(1, 1))
          (post): Identity()
        )
    """
    if example_input is None:
        raise StitchError("stitch() needs example_input=<a batch like your data>, e.g. torch.randn(2, 3, 32, 32)")
    device = next((p.device for p in sender.parameters()), None)
    if device is not None:  # a tensor, or a tuple or dict of them (a HuggingFace batch)
        example_input = to_device(example_input, device)
    sender_address = parse_address(sender, sender_layer)
    receiver_address = parse_address(receiver, receiver_layer)
    provided = _probe(sender, sender_address, example_input, sender_output, role="sender")
    expected = _probe(receiver, receiver_address, example_input, receiver_output, role="receiver")
    receiver_suffix = suffix(
        receiver, str(receiver_address), example_input=example_input, method=suffix_method, output=receiver_output
    )
    return assemble(
        sender,
        receiver,
        provided,
        expected,
        receiver_suffix,
        kind=kind,
        init=init,
        init_data=init_data,
        sender_output=sender_output,
        receiver_output=receiver_output,
        **stitch_options,
    )


def assemble(
    sender: nn.Module,
    receiver: nn.Module,
    provided: ActivationSpec,
    expected: ActivationSpec,
    receiver_suffix: Suffix,
    *,
    kind: str = "auto",
    init: str = "auto",
    init_data: Any = None,
    sender_output: OutputSelector = None,
    receiver_output: OutputSelector = None,
    **stitch_options: Any,
) -> StitchedModel:
    """Build a `StitchedModel` from already probed specs and an already cut suffix.

    `stitch` without the probing: a study that stitches many layer pairs of
    the same networks probes each network once and cuts each receiver once.
    """
    if init not in _INITS:
        raise StitchError(f"init={init!r}: use one of {_INITS}")
    if init == "lstsq" and init_data is None:
        raise StitchError("init='lstsq' needs init_data=<a Dataset or DataLoader of inputs> to fit the stitch on")
    if init_data is not None and init != "lstsq":
        raise StitchError(f"init_data is read only with init='lstsq' (init is {init!r}); drop it or set init='lstsq'")
    # what the networks report of their token sequences (timm ViTs: prefix tokens, patch grid), as a hint
    stitch_options.setdefault(
        "token_layouts", (token_layout(sender, provided.name), token_layout(receiver, expected.name))
    )
    stitch_module = make_stitch(
        provided, expected, kind=kind, init="random" if init in ("lstsq", "auto") else init, **stitch_options
    )
    device = next((p.device for p in sender.parameters()), None)
    dtype = provided.dtype if provided.dtype.is_floating_point else None
    stitch_module = stitch_module.to(device=device, dtype=dtype)
    stitched = StitchedModel(
        sender,
        receiver,
        stitch_module,
        provided=provided,
        expected=expected,
        sender_prefix=Prefix(sender, _single_call(provided), output=sender_output),
        receiver_prefix=Prefix(receiver, _single_call(expected), output=receiver_output),
        receiver_suffix=receiver_suffix,
        init=init,
    )
    if init == "lstsq":
        fit_least_squares(stitched, init_data)
    return stitched


_INITS = ("auto", "random", "identity", "lstsq")


def _probe(
    model: nn.Module, address: Address, example_input: Any, output: OutputSelector, *, role: str
) -> ActivationSpec:
    try:
        (spec,) = layer_specs(model, example_input, [str(address)], output=output)
    except StitchError as err:
        raise StitchError(f"{role} {type(model).__name__}: {err}") from None
    except (RuntimeError, ValueError) as err:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise StitchError(
            f"{role} {type(model).__name__} failed on example_input {shape}: {first_line(err)}; example_input must "
            "be a batch the network accepts, with the batch dimension first (e.g. images.unsqueeze(0) for one image)"
        ) from err
    return spec


def _single_call(spec: ActivationSpec) -> str:
    """Address a layer the probe saw run once as ``name:0``, so a prefix stops right after it."""
    if spec.name == "input" or ":" in spec.name:
        return spec.name
    return f"{spec.name}:0"
