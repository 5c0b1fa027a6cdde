"""`Task`: what a receiver's output predicts, and how a loss, an accuracy and a distribution are read from it.

A classifier's logits ``[B, C]`` predict one label per sample; a language
model's logits ``[B, T, V]`` predict a token per position, and a causal one
(GPT-2, Llama) predicts at position ``t`` the token at ``t + 1``. `task_of`
tells them apart from the receiver, so training, evaluation and the scores
read every receiver the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StitchError

__all__ = ["IGNORE_INDEX", "Task", "cross_entropy", "logits_of", "task_of"]

IGNORE_INDEX = -100
"""A label that is not scored (padding, prompt tokens): the convention of `torch.nn.functional.cross_entropy`."""


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or ``output.logits`` / ``output["logits"]``.

    Raises:
        StitchError: the output holds no logits (pass ``loss_fn=`` to score it).

    Examples:
        >>> logits_of({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise StitchError(
        f"the receiver returns {type(output).__name__}, with no logits; pass loss_fn=lambda output, labels: ..."
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """How a receiver's output is scored.

    Attributes:
        causal: the logits at position ``t`` predict the label at ``t + 1``
            (a causal language model; labels are the input ids, as in
            HuggingFace, and are shifted here).
    """

    causal: bool = False

    def aligned(self, output: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[..., C]`` and labels ``[...]`` (or soft labels ``[..., C]``) position by position.

        Raises:
            StitchError: a causal model's sequences have no position to predict, or the labels' shape does
                not fit the logits'.
        """
        logits = logits_of(output)
        if self.causal:
            if logits.dim() < 3 or logits.shape[1] < 2:
                raise StitchError(
                    f"a causal language model predicts the next token, so its sequences need at least 2 tokens; "
                    f"its logits have shape {tuple(logits.shape)}"
                )
            logits, labels = logits[:, :-1], labels[:, 1:]
        soft = labels.is_floating_point() and labels.shape == logits.shape
        if not soft and (labels.is_floating_point() or labels.shape != logits.shape[:-1]):
            raise StitchError(
                f"labels of shape {tuple(labels.shape)} ({labels.dtype}) do not fit outputs of shape "
                f"{tuple(logits.shape)}: give class indices (integers) of shape output.shape[:-1], or soft labels "
                "(floats) of the output's shape"
            )
        return logits, labels

    def loss(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over the scored positions (labels of `IGNORE_INDEX` left out).

        Raises:
            StitchError: labels out of the receiver's class range, or shapes that do not fit.
        """
        logits, labels = self.aligned(output, labels)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if labels.is_floating_point():
            return F.cross_entropy(flat, labels.reshape(flat.shape).float())
        targets = labels.reshape(-1)
        scored = targets[targets != IGNORE_INDEX]
        if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= flat.shape[1]):
            raise StitchError(
                f"labels must be class indices 0..{flat.shape[1] - 1} for the receiver's {flat.shape[1]} outputs; "
                f"this batch has labels from {int(scored.min())} to {int(scored.max())} ({IGNORE_INDEX} leaves a "
                "position out)"
            )
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)

    def hits(self, output: Any, labels: torch.Tensor) -> tuple[int, int]:
        """``(correct, scored)`` predictions of one batch: the argmax against the labels (or their argmax).

        A non-tensor output without logits, or one without a class dimension, scores nothing.
        """
        correct = self.correct(output, labels)
        return int(correct.sum()), int(correct.numel())

    def correct(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        """Whether each scored prediction of one batch is right: a flat bool tensor, one entry per sample (per
        scored position for token outputs), in order; empty where `hits` scores nothing."""
        try:
            logits = logits_of(output)
        except StitchError:
            return torch.zeros(0, dtype=torch.bool)
        if logits.dim() < 2:
            return torch.zeros(0, dtype=torch.bool)
        logits, labels = self.aligned(output, labels)
        if labels.is_floating_point():
            return (logits.argmax(-1) == labels.argmax(-1)).reshape(-1)
        scored = labels != IGNORE_INDEX
        return (logits.argmax(-1) == labels)[scored]

    def labels_for(self, inputs: Any, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels to score: the data's (or, for a causal model without them, its input ids), padding left out.

        Token labels ``[B, T]`` at positions whose ``attention_mask`` is 0 become `IGNORE_INDEX`.
        """
        if labels is None:
            return self.labels_from(inputs)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is not None and not labels.is_floating_point() and labels.shape == mask.shape:
            return labels.masked_fill(mask == 0, IGNORE_INDEX)
        return labels

    def labels_from(self, inputs: Any) -> torch.Tensor | None:
        """A causal model's labels when the data has none: its input ids, with padding left out.

        Returns ``None`` for other tasks, or inputs without ``input_ids``.
        """
        if not self.causal or not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            return None
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)


def task_of(model: nn.Module) -> Task:
    """The `Task` of a receiver: causal for a model that generates text (HuggingFace ``can_generate()``).

    Examples:
        >>> task_of(nn.Linear(4, 2))
        Task(causal=False)
    """
    can_generate = getattr(model, "can_generate", None)
    causal = False
    if callable(can_generate):
        try:
            causal = bool(can_generate())
        except Exception:  # a model's own method: anything it raises means "no"
            causal = False
    return Task(causal=causal)


def cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """The cross entropy of a classifier's logits (or any output `logits_of` reads) against labels.

    `Task.loss` of a task that is not causal: the default ``loss_fn`` of every receiver that does not
    generate text.
    """
    return Task().loss(output, labels)
