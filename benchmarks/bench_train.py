"""Time one stitching cell three ways: the library's study path, a naive hooked loop, and the floor.

For a pair of small CIFAR-style ResNets (`modelstitch.zoo.small_resnet`, sender R1111, receiver R1211) on
random 32x32 inputs, every cell ``sender_layer -> receiver_layer`` is trained for the same recipe and number
of optimiser steps by:

- ``library``: ``ms.train_stitch(stitched, data, recipe=..., cache=True, progress=False, device=...)``, the
  default study path (the sender's activations are computed once into a cache, then only the stitch and the
  receiver's suffix run per step). Building the `StitchedModel` is not timed; filling the cache is.
- ``naive``: the loop of several public stitching codes: every step runs both full networks with forward
  hooks, the sender under ``no_grad`` with a hook that captures its layer, the receiver (parameters frozen)
  with a hook that replaces its layer's output by the stitch's output; SGD on the stitch.
- ``floor``: the least work any method must do: the sender's activations are precomputed outside the timer,
  and each step runs only stitch + receiver suffix forward, backward to the stitch (no weight gradients in
  the receiver) and the SGD step.

Methods are interleaved, repeated (``--repeats``) and the median time of each is kept. Printed and written
to ``--json``: seconds per method (summed over the cells), ``ratio_to_floor`` = library / floor and
``speedup_vs_naive`` = naive / library, and the peak memory of each method (CUDA: the most memory allocated;
CPU on Linux: the peak resident set size during the method, reset before each method through
``/proc/self/clear_refs``, and how far it rose above the RSS at the method's start; elsewhere the process's
lifetime peak RSS from ``resource.getrusage``). psutil is not needed: it reports the current RSS, not a peak.

Usage::

    python benchmarks/bench_train.py [--device cpu|cuda|auto] [--json PATH] [--samples N] [--epochs E] [--width W]

More options: ``--cells layer1.0:layer1.0,layer3.0:layer3.0`` (several cells), ``--repeats``, ``--batch-size``,
``--threads``. On a CPU shared with other busy processes, ``--threads 1`` avoids the large stalls of
intra-op thread pools that wait for a busy core (several times slower at these tiny sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelstitch as ms
from modelstitch import zoo

METHODS = ("library", "naive", "floor")
TARGET_RATIO_TO_FLOOR = 1.3
TARGET_SPEEDUP_VS_NAIVE = 3.0


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of one block of work, in MiB: CUDA allocations, or resident set size on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "cuda_max_memory_allocated" if device.type == "cuda" else self._cpu_scope()

    @staticmethod
    def _cpu_scope() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
            return "rss_peak_per_method"
        except OSError:
            return "rss_peak_of_process"

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """Yields a dict whose ``"mb"`` is filled in on exit."""
        out: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.scope == "rss_peak_per_method":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            out["start_mb"] = _status_kb("VmRSS") / 1024
        yield out
        if self.device.type == "cuda":
            out["mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.scope == "rss_peak_per_method":
            out["mb"] = _status_kb("VmHWM") / 1024
            out["increase_mb"] = out["mb"] - out["start_mb"]
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["mb"] = peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _status_kb(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status``, e.g. ``VmRSS`` or ``VmHWM`` (the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1])
    return math.nan


# --------------------------------------------------------------------------- the three methods


class Cell:
    """Everything the three methods share for one ``sender_layer -> receiver_layer`` cell."""

    def __init__(
        self,
        sender: nn.Module,
        sender_layer: str,
        receiver: nn.Module,
        receiver_layer: str,
        dataset: TensorDataset,
        recipe: ms.Recipe,
        device: torch.device,
    ) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_layer, self.receiver_layer = sender_layer, receiver_layer
        self.dataset, self.recipe, self.device = dataset, recipe, device
        example = dataset.tensors[0][:2].to(device)
        torch.manual_seed(recipe.seed)
        self.template = ms.stitch(sender, sender_layer, receiver, receiver_layer, example_input=example)
        self.initial = copy.deepcopy(self.template.stitch.state_dict())
        self.steps = _steps(recipe, len(dataset))
        self.use_amp = recipe.uses_amp(device)
        self.amp_dtype = getattr(torch, recipe.amp_dtype)
        self._provided: torch.Tensor | None = None

    @property
    def name(self) -> str:
        """``"sender_layer->receiver_layer"``."""
        return f"{self.sender_layer}->{self.receiver_layer}"

    def fresh_stitch(self) -> ms.stitches.Stitch:
        stitch = copy.deepcopy(self.template.stitch)
        stitch.load_state_dict(self.initial)
        return stitch.to(self.device).train()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # (a) ------------------------------------------------------------------
    def library(self) -> float:
        """The library's default study path: ``train_stitch(..., cache=True)``. Returns the mean training loss."""
        stitched = self.template
        stitched.stitch = self.fresh_stitch()  # the same initial weights as the other methods
        result = ms.train_stitch(
            stitched, self.dataset, recipe=self.recipe, cache=True, progress=False, device=self.device
        )
        assert result.steps == self.steps, (result.steps, self.steps)
        return statistics.fmean(result.epoch_losses)

    # (b) ------------------------------------------------------------------
    def naive(self) -> float:
        """Both full networks every step, with hooks; SGD on the stitch."""
        stitch = self.fresh_stitch()
        sender, receiver = self.sender.to(self.device).eval(), self.receiver.to(self.device).eval()
        flags = [(p, p.requires_grad) for p in receiver.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        store: dict[str, torch.Tensor] = {}
        modules_s, modules_r = dict(sender.named_modules()), dict(receiver.named_modules())
        handles = [
            modules_s[self.sender_layer].register_forward_hook(lambda m, i, o: store.__setitem__("act", o)),
            modules_r[self.receiver_layer].register_forward_hook(lambda m, i, o: stitch(store["act"])),
        ]
        optimizer = self.recipe.optimizer(stitch.parameters())
        scheduler = self.recipe.scheduler(optimizer, self.steps)
        loader = DataLoader(
            self.dataset,
            batch_size=self.recipe.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.recipe.seed),
        )
        step, loss_sum, count = 0, 0.0, 0
        try:
            while step < self.steps:
                for x, y in loader:
                    if step >= self.steps:
                        break
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    with self._autocast():
                        with torch.no_grad():
                            sender(x)
                        out = receiver(x)
                    loss = F.cross_entropy(out.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum, count, step = loss_sum + loss.item(), count + 1, step + 1
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
        return loss_sum / max(count, 1)

    # (c) ------------------------------------------------------------------
    def provided(self) -> torch.Tensor:
        """The sender's activations for the whole dataset (computed once, outside every timer)."""
        if self._provided is None:
            x = self.dataset.tensors[0]
            with torch.no_grad():
                parts = [
                    self.template.provided_representation(x[i : i + 256].to(self.device)) for i in range(0, len(x), 256)
                ]
            self._provided = torch.cat(parts)
        return self._provided

    def floor(self) -> float:
        """Stitch + receiver suffix forward/backward (no receiver weight gradients) + SGD, from precomputed inputs."""
        stitch = self.fresh_stitch()
        provided, labels = self.provided(), self.dataset.tensors[1].to(self.device)
        suffix = _suffix_fn(self.receiver.to(self.device).eval(), self.receiver_layer)
        flags = [(p, p.requires_grad) for p in self.receiver.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        optimizer = self.recipe.optimizer(stitch.parameters())
        scheduler = self.recipe.scheduler(optimizer, self.steps)
        generator = torch.Generator().manual_seed(self.recipe.seed)
        n, b = len(provided), self.recipe.batch_size
        step, loss_sum, count = 0, 0.0, 0
        try:
            while step < self.steps:
                order = torch.randperm(n, generator=generator).to(self.device)
                for start in range(0, n - b + 1, b):
                    if step >= self.steps:
                        break
                    index = order[start : start + b]
                    with self._autocast():
                        out = suffix(stitch(provided.index_select(0, index)))
                    loss = F.cross_entropy(out.float(), labels.index_select(0, index))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum, count, step = loss_sum + loss.item(), count + 1, step + 1
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return loss_sum / max(count, 1)


def _study_path(cells: Sequence[Cell]) -> float:
    """Seconds to train every cell in one ``train_stitches`` call, as a study does (one cache, shared suffixes)."""
    models = []
    for cell in cells:
        t = cell.template
        models.append(
            ms.StitchedModel(
                t.sender,
                t.receiver,
                cell.fresh_stitch(),
                provided=t.provided,
                expected=t.expected,
                sender_prefix=t.sender_prefix,
                receiver_prefix=t.receiver_prefix,
                receiver_suffix=t.receiver_suffix,
            )
        )
    first = cells[0]
    _sync(first.device)
    start = time.perf_counter()
    ms.train_stitches(models, first.dataset, recipe=first.recipe, cache=True, progress=False, device=first.device)
    _sync(first.device)
    return time.perf_counter() - start


def _steps(recipe: ms.Recipe, samples: int) -> int:
    """Optimiser steps of a run: whole batches per epoch, times the (possibly fractional) epochs."""
    return max(1, math.ceil(recipe.epochs * max(1, samples // recipe.batch_size)))


def _suffix_fn(model: nn.Module, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A SmallResNet from just after ``layer`` (``"stem"`` or ``"layerS.i"``) to its logits, written by hand."""
    stages = [getattr(model, f"layer{s}") for s in range(1, 5)]
    if layer == "stem":
        rest = [block for stage in stages for block in stage]
    else:
        stage, index = (int(part) for part in layer.removeprefix("layer").split("."))
        rest = list(stages[stage - 1][index + 1 :]) + [block for later in stages[stage:] for block in later]

    def run(h: torch.Tensor) -> torch.Tensor:
        for block in rest:
            h = block(h)
        return model.fc(torch.flatten(model.avgpool(h), 1))

    return run


# --------------------------------------------------------------------------- the benchmark


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--samples", type=int, default=2048, help="random 32x32 training images (default 2048)")
    parser.add_argument("--epochs", type=float, default=4, help="passes over the samples (default 4)")
    parser.add_argument("--width", type=int, default=16, help="channels of stage 1 of both ResNets (default 16)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each method; the median is kept")
    parser.add_argument(
        "--cells",
        default="layer2.0:layer2.0",
        help="comma-separated sender_layer:receiver_layer pairs (default layer2.0:layer2.0)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = ms.core.resolve_device(args.device)
    torch.manual_seed(0)
    sender = zoo.small_resnet("R1111", width=args.width).to(device).eval()
    receiver = zoo.small_resnet("R1211", width=args.width).to(device).eval()
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(
        torch.randn(args.samples, 3, 32, 32, generator=g), torch.randint(0, 10, (args.samples,), generator=g)
    )
    recipe = ms.Recipe.paper(lr=0.05, batch_size=args.batch_size, base_batch_size=args.batch_size, epochs=args.epochs)
    pairs = [tuple(pair.split(":")) for pair in args.cells.split(",")]
    cells = [Cell(sender, s, receiver, r, dataset, recipe, device) for s, r in pairs]
    memory = _PeakMemory(device)

    times: dict[str, dict[str, list[float]]] = {c.name: {m: [] for m in METHODS} for c in cells}
    peaks: dict[str, list[float]] = {m: [] for m in METHODS}
    increase: dict[str, list[float]] = {m: [] for m in METHODS}
    losses: dict[str, dict[str, float]] = {c.name: {} for c in cells}
    for cell in cells:
        cell.provided()  # the floor's precomputation, outside every timer
        warm = copy.copy(cell)  # warm-up, a few steps each: kernel selection, allocator, lazy init
        warm.recipe = recipe.replace(epochs=min(args.epochs, 2 / max(1, len(dataset) // args.batch_size)))
        warm.steps = _steps(warm.recipe, len(dataset))
        for method in METHODS:
            getattr(warm, method)()
    for repeat in range(args.repeats):
        order = METHODS[repeat % 3 :] + METHODS[: repeat % 3]  # interleave, rotating who goes first
        for cell in cells:
            for method in order:
                _sync(device)
                with memory.measure() as peak:
                    start = time.perf_counter()
                    losses[cell.name][method] = getattr(cell, method)()
                    _sync(device)
                    elapsed = time.perf_counter() - start
                times[cell.name][method].append(elapsed)
                peaks[method].append(peak["mb"])
                if "increase_mb" in peak:
                    increase[method].append(peak["increase_mb"])

    together = [_study_path(cells) for _ in range(args.repeats)] if len(cells) > 1 else []

    per_cell = {name: {m: statistics.median(v) for m, v in by_method.items()} for name, by_method in times.items()}
    seconds = {m: sum(per_cell[c.name][m] for c in cells) for m in METHODS}
    if together:
        seconds["library_together"] = statistics.median(together)
    result: dict[str, Any] = {
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "config": {
            "sender": "R1111",
            "receiver": "R1211",
            "width": args.width,
            "samples": args.samples,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "steps_per_cell": cells[0].steps,
            "repeats": args.repeats,
            "cells": [c.name for c in cells],
        },
        "seconds": seconds,
        "seconds_per_cell": per_cell,
        "all_seconds": times,
        "ratio_to_floor": seconds["library"] / seconds["floor"],
        "speedup_vs_naive": seconds["naive"] / seconds["library"],
        **(
            {
                "ratio_to_floor_together": seconds["library_together"] / seconds["floor"],
                "speedup_vs_naive_together": seconds["naive"] / seconds["library_together"],
            }
            if together
            else {}
        ),
        "peak_memory_mb": {m: max(v) for m, v in peaks.items()},
        "memory_scope": memory.scope,
        "peak_memory_increase_mb": {m: max(v) for m, v in increase.items() if v},
        "mean_loss": losses,
        "targets": {"ratio_to_floor_max": TARGET_RATIO_TO_FLOOR, "speedup_vs_naive_min": TARGET_SPEEDUP_VS_NAIVE},
    }
    return result


def report(result: dict[str, Any]) -> str:
    """The human-readable table."""
    config = result["config"]
    lines = [
        f"device={result['device']} torch={result['torch']} cpus={result['cpu_count']} threads={result['threads']}",
        f"R1111 -> R1211, width {config['width']}, {config['samples']} samples, {config['epochs']} epochs, "
        f"batch {config['batch_size']}: {config['steps_per_cell']} steps per cell, median of {config['repeats']}",
        "",
        f"{'cell':<24}" + "".join(f"{m:>12}" for m in METHODS),
    ]
    for name, by_method in result["seconds_per_cell"].items():
        lines.append(f"{name:<24}" + "".join(f"{by_method[m]:>11.3f}s" for m in METHODS))
    lines.append(f"{'total':<24}" + "".join(f"{result['seconds'][m]:>11.3f}s" for m in METHODS))
    lines.append(f"{'peak memory (MiB)':<24}" + "".join(f"{result['peak_memory_mb'][m]:>12.0f}" for m in METHODS))
    if result.get("peak_memory_increase_mb"):
        rise = result["peak_memory_increase_mb"]
        lines.append(f"{'  rise during (MiB)':<24}" + "".join(f"{rise[m]:>12.0f}" for m in METHODS))
    ratio, speedup = result["ratio_to_floor"], result["speedup_vs_naive"]
    ok_ratio = "ok" if ratio <= TARGET_RATIO_TO_FLOOR else "MISSED"
    ok_speedup = "ok" if speedup >= TARGET_SPEEDUP_VS_NAIVE else "MISSED"
    lines += [
        "",
        f"ratio_to_floor   (library / floor) = {ratio:.2f}   target <= {TARGET_RATIO_TO_FLOOR}  [{ok_ratio}]",
        f"speedup_vs_naive (naive / library) = {speedup:.2f}   target >= {TARGET_SPEEDUP_VS_NAIVE}  [{ok_speedup}]",
        f"memory: {result['memory_scope']}",
    ]
    if "ratio_to_floor_together" in result:
        lines += [
            "",
            f"all cells in one train_stitches call (a study's path): {result['seconds']['library_together']:.3f}s",
            f"ratio_to_floor_together   = {result['ratio_to_floor_together']:.2f}",
            f"speedup_vs_naive_together = {result['speedup_vs_naive_together']:.2f}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run, print the table, write ``--json``; returns the results."""
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
