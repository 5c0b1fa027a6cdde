"""Capturing the outputs of named layers with forward hooks that live only inside a block."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import StitchError
from ._address import INPUT, Address, missing_call_error, parse_address, repeated_call_error
from ._outputs import OutputSelector, call_model, select_output

__all__ = ["Activations", "activations", "capture"]


class _StopForward(BaseException):
    """Raised from a hook to end a forward early; caught by the capture that raised it.

    A `BaseException`, so that a model's own ``except Exception`` cannot swallow it.
    """

    def __init__(self, owner: object) -> None:
        super().__init__("forward stopped early by modelstitch.capture")
        self.owner = owner


class Activations(Mapping[str, torch.Tensor]):
    """Captured outputs keyed by the addresses that were asked for.

    A read-only mapping filled during the forward. Reading a layer that was
    asked for but has not run raises `StitchError`.
    """

    def __init__(self, requested: Sequence[str]) -> None:
        self._requested = tuple(requested)
        self._values: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}  # calls of each watched module in the last forward

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer in self._values:
            return self._values[layer]
        if layer in self._requested:
            raise StitchError(
                f"layer {layer!r} has not run yet: call the model inside the capture block, "
                "or check that the forward reaches this module"
            )
        raise StitchError(f"layer {layer!r} was not captured; captured layers: {list(self._requested)}")

    def __contains__(self, layer: object) -> bool:
        return layer in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in self._values.items())
        return f"Activations({{{shapes}}})"


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    detach: bool = True,
    clone: bool | None = None,
    device: torch.device | str | None = None,
    output: OutputSelector | Mapping[str, OutputSelector] = None,
    stop: bool = False,
) -> Iterator[Activations]:
    """Record the outputs of named layers while ``model`` runs inside the block.

    Hooks exist only inside the ``with`` block and are removed in reverse order
    on exit, also on exceptions and ``KeyboardInterrupt``; captures nest.

    Args:
        model: the network to watch.
        layers: one address or a list (see `list_layers`; ``"input"`` and
            ``"name:k"`` are accepted).
        detach: store ``tensor.detach()`` (no autograd history).
        clone: copy each tensor so that in-place operations later in the
            forward cannot change it. ``None`` (default) copies unless the
            forward stops right after the capture, when nothing can change it.
        device: move captured tensors there (``None`` keeps them in place).
        output: which tensor to keep from tuple/dict outputs (see
            `select_output`); a mapping gives a selector per layer.
        stop: end the forward as soon as every requested layer has run, so
            later layers cost nothing. The statement that runs the model is
            then the last one executed in the block. A bare name (no ``":k"``)
            counts as done once its parent module returns, so that a second
            call inside the parent is still detected; top-level modules count
            as done at once.

    Yields:
        `Activations`: a mapping from address to a ``[B, ...]`` tensor.

    Raises:
        StitchError: an unknown layer, or a bare name whose module runs more
            than once in a forward (address one call as ``"name:k"``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with capture(net, ["0", "2"]) as acts:
        ...     _ = net(torch.randn(3, 4))
        >>> acts["0"].shape, acts["2"].shape
        (torch.Size([3, 8]), torch.Size([3, 2]))
    """
    requested = [layers] if isinstance(layers, str) else list(layers)
    if not requested:
        raise StitchError("capture() needs at least one layer; modelstitch.list_layers(model) lists them")
    addresses = [parse_address(model, layer) for layer in requested]
    acts = Activations([str(a) for a in addresses])
    recorder = _Recorder(model, addresses, acts, detach=detach, clone=clone, device=device, output=output, stop=stop)
    try:
        recorder.attach()
        yield acts
    except _StopForward as stopped:
        if stopped.owner is not recorder:
            raise
    finally:
        recorder.detach()


def activations(
    model: nn.Module,
    inputs: Any,
    layers: str | Sequence[str],
    *,
    stop: bool = True,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``inputs`` and return the named layers' outputs.

    The functional form of `capture`; by default the forward stops once every
    requested layer has run.

    Args:
        model: the network.
        inputs: a tensor (called as ``model(inputs)``), a tuple (``model(*inputs)``)
            or a dict (``model(**inputs)``).
        layers: addresses, as for `capture`.
        stop: end the forward early (see `capture`).
        **options: ``detach``, ``clone``, ``device``, ``output`` as for `capture`.

    Returns:
        ``{address: tensor}`` with tensors of shape ``[B, ...]``.

    Raises:
        StitchError: a requested layer did not run.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        >>> activations(net, torch.randn(2, 3, 5, 5), ["0"])["0"].shape
        torch.Size([2, 8, 5, 5])
    """
    with capture(model, layers, stop=stop, **options) as acts:
        call_model(model, inputs)
    missing = [a for a in acts._requested if a not in acts]
    for address in (parse_address(model, layer) for layer in missing):
        calls = acts._calls.get(address.name, 0)
        if address.call is not None and calls <= address.call:
            raise missing_call_error(address, calls)
    if missing:
        raise StitchError(f"layers {missing} did not run when {type(model).__name__} was called on this input")
    return dict(acts)


class _Recorder:
    """The hooks of one `capture` block."""

    def __init__(
        self,
        model: nn.Module,
        addresses: list[Address],
        acts: Activations,
        *,
        detach: bool,
        clone: bool | None,
        device: torch.device | str | None,
        output: OutputSelector | Mapping[str, OutputSelector],
        stop: bool,
    ) -> None:
        self.model = model
        self.addresses = addresses
        self.acts = acts
        self.detach_tensors = detach
        self.clone = clone
        self.device = device
        self.output = output
        self.stop = stop
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.calls = acts._calls
        self.pending: set[str] = set()

    def selector(self, address: Address) -> OutputSelector:
        if isinstance(self.output, Mapping):
            return self.output.get(str(address), self.output.get(address.name))
        return self.output

    def attach(self) -> None:
        self.pending = {str(a) for a in self.addresses}
        self.handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        by_module: dict[str, list[Address]] = {}
        for address in self.addresses:
            if not address.is_input:
                by_module.setdefault(address.name, []).append(address)
        for name, wanted in by_module.items():
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._module_hook(name, wanted)))
            parent = name.rpartition(".")[0]
            if self.stop and parent and any(a.call is None for a in wanted):
                self.handles.append(self.model.get_submodule(parent).register_forward_hook(self._parent_hook(name)))

    def detach(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.clear()
        self.pending = {str(a) for a in self.addresses}
        if any(a.is_input for a in self.addresses):
            first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(first, torch.Tensor):
                raise StitchError(f"{type(module).__name__} was called without a tensor input to capture as 'input'")
            self._record(Address(INPUT), first, finishing=False)
            self._finish(INPUT)

    def _module_hook(self, name: str, wanted: list[Address]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            for address in wanted:
                if address.call is None and call >= 1:
                    raise repeated_call_error(name)
                if address.call in (None, call):
                    key = str(address)
                    immediate = address.call is not None or "." not in name
                    finishing = self.stop and immediate and self.pending == {key}
                    tensor = select_output(output, self.selector(address), layer=key)
                    self._record(address, tensor, finishing=finishing)
                    if immediate:
                        self._finish(key)

        return hook

    def _parent_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name in self.acts:
                self._finish(name)

        return hook

    def _record(self, address: Address, tensor: torch.Tensor, *, finishing: bool) -> None:
        if self.detach_tensors:
            tensor = tensor.detach()
        if self.clone or (self.clone is None and not finishing):
            tensor = tensor.clone()
        if self.device is not None:
            tensor = tensor.to(self.device, non_blocking=True)
        self.acts._values[str(address)] = tensor

    def _finish(self, key: str) -> None:
        self.pending.discard(key)
        if self.stop and not self.pending:
            raise _StopForward(self)
