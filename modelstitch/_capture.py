"""Addressing layers by name and capturing their outputs with forward hooks.

A *layer address* is a module path from ``model.named_modules()``
(``"layer3.1"``), the special name ``"input"`` (the model's first input), or
``"name:k"`` for the k-th call (0-based) of a module that runs more than once
per forward, such as the ``relu`` that torchvision's ``BasicBlock`` reuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._errors import StitchError
from ._spec import ActivationSpec

__all__ = [
    "INPUT",
    "Activations",
    "Address",
    "OutputSelector",
    "activations",
    "capture",
    "layer_specs",
    "list_layers",
    "parse_address",
    "replace_output",
    "select_output",
]

INPUT = "input"

OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
"""Which tensor of a structured (tuple, dict, ``ModelOutput``) output to use:
``None`` for the first tensor, an ``int`` index, a ``str`` key, or a callable."""


@dataclasses.dataclass(frozen=True)
class Address:
    """A parsed layer address.

    Attributes:
        name: the module path (``""`` never appears; ``"input"`` is special).
        call: the 0-based call index from ``"name:k"``, or ``None`` for a bare
            name (which must run exactly once per forward).
    """

    name: str
    call: int | None = None

    def __str__(self) -> str:
        return self.name if self.call is None else f"{self.name}:{self.call}"

    @property
    def is_input(self) -> bool:
        """Whether this is the special ``"input"`` address."""
        return self.name == INPUT


def list_layers(model: nn.Module) -> list[str]:
    """Every layer address that `capture` and `stitch` accept for ``model``.

    ``"input"`` first, then every submodule path in definition order. A
    module that runs several times per forward is addressed ``"name:k"``; use
    `layer_specs` to see which do.

    Args:
        model: any ``nn.Module``.

    Returns:
        Layer names, e.g. ``["input", "conv1", "bn1", ..., "fc"]``.

    Examples:
        >>> list_layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
        ['input', '0', '1']
    """
    return [INPUT] + [name for name, _ in model.named_modules() if name]


def parse_address(model: nn.Module, layer: str) -> Address:
    """Validate ``layer`` against ``model`` and split off a ``":k"`` call index.

    Raises:
        StitchError: the name is not a layer of ``model`` (the message lists the
            closest valid names), or the call index is not a non-negative int.

    >>> parse_address(nn.Sequential(nn.ReLU()), "0:1")
    Address(name='0', call=1)
    """
    if not isinstance(layer, str):
        raise StitchError(f"a layer address is a string such as 'layer3.1', got {layer!r} ({type(layer).__name__})")
    name, sep, call_text = layer.rpartition(":")
    if not sep:
        name, call = layer, None
    else:
        try:
            call = int(call_text)
        except ValueError:
            call = -1
        if call < 0:
            raise StitchError(f"layer {layer!r}: the part after ':' must be a call index 0, 1, 2, ... (e.g. 'relu:1')")
    if name == INPUT:
        if call is not None:
            raise StitchError(f"layer {layer!r}: 'input' takes no call index")
        return Address(INPUT)
    if not name or not _has_submodule(model, name):
        valid = list_layers(model)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        raise StitchError(
            f"{type(model).__name__} has no layer {name!r}.{hint} "
            "modelstitch.list_layers(model) lists every valid name."
        )
    return Address(name, call)


def _has_submodule(model: nn.Module, name: str) -> bool:
    # walks the dotted path only: cheap enough for every forward of a prefix
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def select_output(output: Any, selector: OutputSelector = None, *, layer: str = "?") -> torch.Tensor:
    """Pick one tensor out of a module's output.

    Args:
        output: a tensor, a tuple/list, or a mapping (dict, ``ModelOutput``).
        selector: ``None`` takes the tensor itself or the first tensor inside;
            an ``int`` indexes a sequence, a ``str`` keys a mapping, a callable
            is applied to the output.
        layer: the layer's address, for error messages.

    Returns:
        The selected tensor, shape ``[B, ...]``.

    Examples:
        >>> select_output((torch.zeros(1), torch.ones(2)), 1)
        tensor([1., 1.])
    """
    if callable(selector):
        picked = selector(output)
    elif selector is None:
        picked = _first_tensor(output)
    else:
        try:
            picked = output[selector]
        except (KeyError, IndexError, TypeError) as err:
            raise StitchError(
                f"layer {layer!r}: cannot select {selector!r} from its output of type {type(output).__name__}"
            ) from err
    if not isinstance(picked, torch.Tensor):
        raise StitchError(
            f"layer {layer!r} gives {type(output).__name__}, with no tensor at {selector!r}; "
            "pass output=<index, key or function> to pick the tensor to use"
        )
    return picked


def replace_output(output: Any, selector: OutputSelector, new: torch.Tensor, *, layer: str = "?") -> Any:
    """Return ``output`` with the tensor that `select_output` picks swapped for ``new``.

    Raises:
        StitchError: ``selector`` is a callable (there is no place to put ``new``).
    """
    if isinstance(output, torch.Tensor):
        return new
    if callable(selector):
        raise StitchError(f"layer {layer!r}: cannot replace an output picked by a function; use an index or key")
    key = _first_tensor_key(output) if selector is None else selector
    if isinstance(output, tuple):
        items = list(output)
        items[key] = new
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    if isinstance(output, list):
        items = list(output)
        items[key] = new
        return items
    if isinstance(output, Mapping):
        replaced = output.copy() if hasattr(output, "copy") else dict(output)
        replaced[key] = new
        return replaced
    raise StitchError(f"layer {layer!r}: cannot replace a tensor inside {type(output).__name__}")


def _first_tensor_key(output: Any) -> Any:
    items = output.items() if isinstance(output, Mapping) else enumerate(output)
    for key, value in items:
        if isinstance(value, torch.Tensor):
            return key
    return None


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list, Mapping)):
        key = _first_tensor_key(output)
        return None if key is None else output[key]
    return None


class _StopForward(Exception):
    """Raised from a hook to end a forward early; caught by the capture that raised it."""

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
    if missing:
        raise StitchError(f"layers {missing} did not run when {type(model).__name__} was called on this input")
    return dict(acts)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


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
        self.calls: dict[str, int] = {}
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
                    raise StitchError(
                        f"module {name!r} ran more than once in one forward; "
                        f"address one call as '{name}:0', '{name}:1', ... (modelstitch.layer_specs lists them)"
                    )
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


def layer_specs(
    model: nn.Module,
    example_input: Any,
    layers: Sequence[str] | None = None,
    *,
    output: OutputSelector | Mapping[str, OutputSelector] = None,
) -> list[ActivationSpec]:
    """Probe ``model`` once and describe the output of each layer.

    The probe runs in eval mode without gradients; the model's modes are
    restored afterwards and no parameter or buffer changes.

    Args:
        model: the network.
        example_input: a batch like the real data, e.g. ``torch.randn(1, 3, 32, 32)``
            (a tuple or dict is passed as positional or keyword inputs).
        layers: restrict to these addresses (default: every module whose
            output holds a tensor).
        output: tensor selector for structured outputs, as for `capture`.

    Returns:
        One `ActivationSpec` per address in execution order; ``"input"`` first.
        A module that ran ``n > 1`` times gives ``n`` specs ``"name:0"`` ...
        ``"name:{n-1}"``, each with ``calls == n``.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Flatten())
        >>> [(s.name, s.shape) for s in layer_specs(net, torch.randn(1, 3, 9, 9))]
        [('input', (3, 9, 9)), ('0', (8, 4, 4)), ('1', (128,))]
    """
    wanted = None if layers is None else {str(parse_address(model, layer)) for layer in layers}
    seen: list[tuple[str, int, torch.Tensor]] = []
    calls: dict[str, int] = {}
    handles = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            call = calls.get(name, 0)
            calls[name] = call + 1
            sel = output.get(name) if isinstance(output, Mapping) else output
            try:
                tensor = select_output(out, sel, layer=name)
            except StitchError:
                return
            seen.append((name, call, tensor))

        return hook

    modules = [(name, m) for name, m in model.named_modules() if name]
    with frozen(model), torch.no_grad():
        try:
            for name, module in modules:
                handles.append(module.register_forward_hook(record(name)))
            inputs = call_model_capturing_input(model, example_input)
        finally:
            for handle in reversed(handles):
                handle.remove()
    specs = [ActivationSpec(INPUT, tuple(inputs.shape[1:]), inputs.dtype, 1)]
    for name, call, tensor in seen:
        address = name if calls[name] == 1 else f"{name}:{call}"
        specs.append(ActivationSpec(address, tuple(tensor.shape[1:]), tensor.dtype, calls[name]))
    if wanted is None:
        return specs
    found = {s.name: s for s in specs}
    for address in wanted:
        name = address.rpartition(":")[0] if ":" in address else address
        if address not in found and calls.get(name, 0) > 1 and ":" not in address:
            raise StitchError(
                f"module {name!r} runs {calls[name]} times per forward; address one call as "
                f"'{name}:0' ... '{name}:{calls[name] - 1}'"
            )
        if address not in found:
            raise StitchError(f"layer {address!r} did not produce a tensor when {type(model).__name__} ran")
    return [s for s in specs if s.name in wanted]


def call_model_capturing_input(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` and return the tensor that counts as its ``"input"``."""
    call_model(model, inputs)
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs if isinstance(inputs, tuple) else tuple(inputs.values()) if isinstance(inputs, dict) else ()
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None:
        raise StitchError(f"example_input must be a tensor, or a tuple/dict holding one; got {type(inputs).__name__}")
    return first


@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode with ``requires_grad=False`` inside the block.

    Every module's ``training`` flag and every parameter's ``requires_grad``
    flag is put back exactly as it was on exit, also on exceptions. Autograd
    records ``requires_grad`` when the forward runs, so a backward after the
    block still computes no gradient for these parameters.
    """
    modules: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}
    for model in models:
        for m in model.modules():
            modules.setdefault(id(m), m)
        for p in model.parameters():
            params.setdefault(id(p), p)
    modes = [(m, m.training) for m in modules.values()]
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for m, _ in modes:
            m.training = False
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
