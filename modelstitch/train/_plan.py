"""`Plan`: which frozen computations a set of stitched models needs, shared where possible."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._errors import StitchError
from ..core import Positions, call_model, first_input_tensor, position_mask, prefix_outputs
from ..stitches import StitchedModel
from ._task import logits_of, task_of

__all__ = ["OBJECTIVES", "LossFn", "Plan", "kl_to"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``(receiver output, labels) -> scalar loss``."""

OBJECTIVES = ("task", "mse", "kl")
"""What a stitch trains for: the receiver's task, its representation, or its own output distribution."""


class Plan:
    """Which frozen computations the models need, shared where possible."""

    def __init__(
        self,
        models: Sequence[StitchedModel],
        objective: str,
        loss_fn: LossFn | None = None,
        share_suffix: bool = False,
        positions: Positions | None = None,
    ) -> None:
        self.models = list(models)
        self.objective = objective
        self.positions = positions
        self.tasks = [task_of(m.receiver) for m in models]
        self.loss_fns = [loss_fn or task.loss for task in self.tasks]
        self.provided_keys = [m.sender_prefix.key for m in models]
        self.expected_keys = [m.receiver_prefix.key for m in models]
        self.reference_keys = [f"output:{id(m.receiver)}" for m in models]  # the receiver's own output, for "kl"
        self.sender_prefixes = list({m.sender_prefix.key: m.sender_prefix for m in models}.values())
        self.receiver_prefixes = (
            list({m.receiver_prefix.key: m.receiver_prefix for m in models}.values()) if objective == "mse" else []
        )
        self.references = {k: m.receiver for k, m in zip(self.reference_keys, models)} if objective == "kl" else {}
        self.needs_input = objective in ("task", "kl") and any(m.receiver_suffix.needs_input for m in models)
        # with share_suffix, models of one receiver layer run its suffix once, on concatenated stitch outputs
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.expected_keys):
            groups.setdefault(key if share_suffix else str(i), []).append(i)
        self.suffix_groups = list(groups.values())

    def frozen_outputs(self, x: Any) -> dict[str, torch.Tensor]:
        """Provided (and, for "mse", expected; for "kl", the receivers' own logits) tensors of one batch, keyed.

        The senders run under whatever autocast is active (the recipe's
        numerics); the targets of the "mse" and "kl" objectives are always
        computed in full precision.
        """
        with torch.no_grad():
            out = prefix_outputs(self.sender_prefixes, x)
            if self.receiver_prefixes or self.references:
                with torch.autocast(device_type=_device_type(x), enabled=False):
                    out.update(prefix_outputs(self.receiver_prefixes, x))
                    for key, receiver in self.references.items():
                        out[key] = logits_of(call_model(receiver, x)).float()
        return out

    def labels(self, x: Any, y: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's labels for the "task" objective: the data's, or a causal receiver's next tokens.

        Raises:
            StitchError: the data has no labels and no receiver can make them.
        """
        if self.objective != "task":
            return y
        if y is not None:
            return self.tasks[0].labels_for(x, y) if self.tasks else y
        made = next((t.labels_from(x) for t in self.tasks if t.causal), None)
        if made is None or not all(t.causal for t in self.tasks):
            raise StitchError(
                "the 'task' objective needs labels: the data yields inputs only (a causal language model takes "
                "its next tokens from input_ids; otherwise give labels, or use objective='kl' or 'mse', which need "
                "none)"
            )
        return made

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
        y = self.labels(x, y)
        for full_group in self.suffix_groups:
            group = full_group if active is None else [i for i in full_group if active[i]]
            if not group:
                continue
            with amp, self.models[group[0]].errors_named():
                outs = [self.models[i].adapt(reps[self.provided_keys[i]]) for i in group]
                if self.objective == "mse":
                    losses = [
                        self._mse(o, reps[self.expected_keys[i]], reps[self.provided_keys[i]], x)
                        for o, i in zip(outs, group)
                    ]
                else:
                    suffix = self.models[group[0]].receiver_suffix
                    joined = torch.cat(outs) if len(group) > 1 else outs[0]
                    x_rep = None if not suffix.needs_input else _repeat(x, len(group))
                    result = suffix(joined, x_rep)
                    parts = logits_of(result).chunk(len(group)) if len(group) > 1 else [result]
                    if self.objective == "kl":
                        mask = _position_mask(x)
                        losses = [kl_to(reps[self.reference_keys[i]], part, mask) for part, i in zip(parts, group)]
                    else:
                        losses = [self.loss_fns[i](part, y) for part, i in zip(parts, group)]
            yield group, losses

    def _mse(self, output: torch.Tensor, expected: torch.Tensor, provided: torch.Tensor, x: Any) -> torch.Tensor:
        """Mean squared error over the positions that count (all of them but for token sequences)."""
        mask = position_mask(x, [expected, provided], self.positions)
        if mask is None:
            return F.mse_loss(output.float(), expected.float())
        squared = (output.float() - expected.float()).square().mean(-1)
        return squared[mask].mean()


def _device_type(x: Any) -> str:
    first = first_input_tensor(x)
    return "cpu" if first is None else first.device.type


def kl_to(reference: torch.Tensor, output: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(reference ‖ output)``, the receiver's own distribution against the stitched one, in nats.

    Averaged over samples (and, for sequence logits ``[B, T, V]``, over the
    positions ``mask`` ``[B, T]`` keeps).

    Args:
        reference: the receiver's own logits ``[B, C]`` or ``[B, T, V]``.
        output: the stitched network's output (logits, or a ``ModelOutput``).
        mask: positions to score, for sequence logits (``None``: all).

    Examples:
        >>> logits = torch.randn(3, 5)
        >>> float(kl_to(logits, logits))
        0.0
    """
    logits = logits_of(output).float()
    if logits.shape != reference.shape:
        shapes = f"{tuple(logits.shape)} and the receiver's {tuple(reference.shape)}"
        raise StitchError(f"the stitched output and the receiver's own differ in shape: {shapes}")
    log_p, log_q = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    if mask is None or per_position.dim() < 2:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


def _position_mask(x: Any) -> torch.Tensor | None:
    return x.get("attention_mask") if isinstance(x, dict) else None


def _repeat(x: Any, times: int) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.cat([x] * times)
    if isinstance(x, dict):
        return {k: _repeat(v, times) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    raise StitchError("models trained together through a hooked suffix need a tensor or dict input")
