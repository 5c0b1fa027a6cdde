"""`Plan`: which frozen computations a set of stitched models needs, shared where possible."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StitchError
from ..core import activations
from ..stitches import StitchedModel

__all__ = ["LossFn", "Plan", "cross_entropy"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise StitchError(
            f"the receiver returns {type(output).__name__}, not logits; pass loss_fn=lambda output, labels: ..."
        )
    try:
        return F.cross_entropy(output.float(), labels)
    except (IndexError, RuntimeError):
        if output.dim() == 2 and labels.dtype in (torch.int64, torch.int32) and labels.numel():
            low, high, classes = int(labels.min()), int(labels.max()), output.shape[1]
            if low < 0 or high >= classes:
                raise StitchError(
                    f"labels must be class indices 0..{classes - 1} for the receiver's {classes} outputs; "
                    f"this batch has labels from {low} to {high}"
                ) from None
        raise


class Plan:
    """Which frozen computations the models need, shared where possible."""

    def __init__(
        self, models: Sequence[StitchedModel], objective: str, loss_fn: LossFn, share_suffix: bool = False
    ) -> None:
        self.models = list(models)
        self.objective = objective
        self.loss_fn = loss_fn
        self.provided_keys = [f"s{id(m.sender)}:{m.sender_prefix.address}" for m in models]
        self.expected_keys = [f"r{id(m.receiver)}:{m.receiver_prefix.address}" for m in models]
        self.sender_layers = _group(
            {k: (m.sender, str(m.sender_prefix.address)) for k, m in zip(self.provided_keys, models)}
        )
        self.receiver_layers = (
            _group({k: (m.receiver, str(m.receiver_prefix.address)) for k, m in zip(self.expected_keys, models)})
            if objective == "mse"
            else {}
        )
        self.needs_input = objective == "task" and any(m.receiver_suffix.needs_input for m in models)
        # with share_suffix, models of one receiver layer run its suffix once, on concatenated stitch outputs
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.expected_keys):
            groups.setdefault(key if share_suffix else str(i), []).append(i)
        self.suffix_groups = list(groups.values())

    def frozen_outputs(self, x: Any) -> dict[str, torch.Tensor]:
        """Provided (and, for "mse", expected) representations of one batch, keyed.

        The senders run under whatever autocast is active (the recipe's
        numerics); the expected representations, the targets of the "mse"
        objective, are always computed in full precision.
        """
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for net, layers in self.sender_layers.values():
                out.update(_capture(net, x, layers))
            if self.receiver_layers:
                with torch.autocast(device_type=_device_type(x), enabled=False):
                    for net, layers in self.receiver_layers.values():
                        out.update(_capture(net, x, layers))
        return out

    def group_losses(
        self,
        reps: dict[str, torch.Tensor],
        x: Any,
        y: torch.Tensor | None,
        amp: torch.autocast,
        active: Sequence[bool] | None = None,
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Scalar losses, one suffix group at a time (so each group's graph can be freed before the next).

        Models whose ``active`` entry is false are left out (their suffix does not run).
        """
        if self.objective == "task" and y is None:
            raise StitchError("the 'task' objective needs labels: the data yields inputs only")
        for full_group in self.suffix_groups:
            group = full_group if active is None else [i for i in full_group if active[i]]
            if not group:
                continue
            with amp, self.models[group[0]].errors_named():
                outs = [self.models[i].adapt(reps[self.provided_keys[i]]) for i in group]
                if self.objective == "mse":
                    losses = [F.mse_loss(o.float(), reps[self.expected_keys[i]].float()) for o, i in zip(outs, group)]
                else:
                    suffix = self.models[group[0]].receiver_suffix
                    joined = torch.cat(outs) if len(group) > 1 else outs[0]
                    x_rep = None if not suffix.needs_input else _repeat(x, len(group))
                    result = suffix(joined, x_rep)
                    parts = result.chunk(len(group)) if len(group) > 1 else [result]
                    losses = [self.loss_fn(part, y) for part in parts]
            yield group, losses


def _capture(net: nn.Module, x: Any, layers: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    acts = activations(net, x, [layer for _, layer in layers])
    return {key: acts[layer] for key, layer in layers}


def _device_type(x: Any) -> str:
    tensors = [x] if isinstance(x, torch.Tensor) else list(x.values() if isinstance(x, dict) else x)
    return next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")


def _group(items: dict[str, tuple[nn.Module, str]]) -> dict[int, tuple[nn.Module, list[tuple[str, str]]]]:
    groups: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for key, (net, layer) in items.items():
        groups.setdefault(id(net), (net, []))[1].append((key, layer))
    return groups


def _repeat(x: Any, times: int) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.cat([x] * times)
    raise StitchError("models trained together through a hooked suffix need a plain tensor input")
