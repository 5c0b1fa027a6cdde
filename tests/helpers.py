"""Tiny real models shared by the tests."""

from __future__ import annotations

import collections

import torch
from torch import nn


class SkipNet(nn.Module):
    """A skip connection across ``body``: cutting at ``body`` is not clean, cutting at ``head_in`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head_in = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.body(h) + h
        y = self.head_in(y)
        return self.fc(self.pool(y).flatten(1))


class TupleNet(nn.Module):
    """A module with a tuple output and a module called twice (``act``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = PairBlock()
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, side = self.pair(x)
        return self.fc(self.act(main) + self.act(side))


class PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def call_counter(model: nn.Module) -> tuple[collections.Counter, list]:
    """Forward hooks on every submodule that count calls; returns (counter, handles)."""
    counts: collections.Counter = collections.Counter()
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: counts.update([name])))
    return counts, handles


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """Same keys and values; compared on the CPU, since nn.DataParallel moves a module to cuda:0 itself."""
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k].cpu(), snapshot[k].cpu()) for k in snapshot)
