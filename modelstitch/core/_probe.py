"""`layer_specs`: one probe forward that describes every layer's output."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import StitchError
from ._address import INPUT, missing_call_error, parse_address, repeated_call_error
from ._freeze import frozen
from ._outputs import OutputSelector, call_model_capturing_input, select_output
from ._spec import ActivationSpec

__all__ = ["layer_specs"]


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
    named = None if wanted is None else {parse_address(model, key).name for key in wanted}
    seen: list[tuple[str, int, torch.Tensor]] = []
    calls: dict[str, int] = {}
    refused: dict[str, StitchError] = {}  # why a layer's output gave no tensor
    handles = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            call = calls.get(name, 0)
            calls[name] = call + 1
            if named is not None and name not in named:
                return
            sel = output.get(name) if isinstance(output, Mapping) else output
            try:
                tensor = select_output(out, sel, layer=name)
            except StitchError as err:
                refused[name] = err
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
    batch = inputs.shape[0] if inputs.dim() else None
    specs = [ActivationSpec(INPUT, tuple(inputs.shape[1:]), inputs.dtype, 1)]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, call, tensor in seen:
        address = name if calls[name] == 1 else f"{name}:{call}"
        shapes[address] = tuple(tensor.shape)
        specs.append(ActivationSpec(address, tuple(tensor.shape[1:]), tensor.dtype, calls[name]))
    if wanted is None:
        return specs
    found = {s.name: s for s in specs}
    for key in sorted(wanted - found.keys()):
        address = parse_address(model, key)
        count = calls.get(address.name, 0)
        if address.call is None and count > 1:
            raise repeated_call_error(address.name, count)
        if address.call is not None and count <= address.call:
            raise missing_call_error(address, count)
        if address.name in refused:
            raise refused[address.name]
        raise StitchError(f"layer {key!r} did not produce a tensor when {type(model).__name__} ran")
    for key in sorted(wanted - {INPUT}):
        shape = shapes[key]
        if batch is not None and (not shape or shape[0] != batch):
            raise StitchError(
                f"layer {key!r} gives a tensor of shape {shape} for example_input's batch of {batch}; a stitchable "
                "layer output has the batch first (a selector that indexes the batch, or a layer that folds "
                "[B, T, C] into [B*T, C]?): stitch at a layer that keeps the batch first"
            )
    return [s for s in specs if s.name in wanted]
