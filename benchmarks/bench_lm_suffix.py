"""Time one training step of a language-model stitch three ways: the skip suffix, the hooked suffix, and the floor.

HuggingFace models do not trace with ``torch.fx``, so the receiver's suffix cannot be a cut graph; the library
runs it by the ``"skip"`` method instead (`modelstitch.suffix(..., method="skip")`): the model's own forward
runs, the blocks of ``transformer.h`` before the layer pass their input through and the layer returns the
given representation, so only the embeddings, the blocks after the layer and the head do work. This script
measures what that costs against doing the least work, for one middle-layer cell of a GPT-2-style pair: two
``transformers.GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=T, n_embd=W, n_layer=L, n_head=4))`` of
different seeds, sender layer ``transformer.h.{L//2 - 1}``, receiver layer ``transformer.h.{L//2}``, on batches of
random byte ids (``{"input_ids": [B, T], "attention_mask": ones [B, T]}``).

Every method does the same optimiser step, from the sender's activations at its layer, precomputed outside every
timer (as the library's activation cache does): stitch forward, the rest of the receiver forward, next-token cross
entropy (``modelstitch.train.task_of(receiver).loss(output, labels)`` with labels = input ids), backward to the
stitch (the receiver is frozen: no weight gradients), SGD step. Only how the rest of the receiver runs differs:

- ``skip``: the library's suffix, method ``"skip"``, called as the training loop calls it
  (``stitched.receiver_suffix(stitched.adapt(rep), x)`` inside ``stitched.frozen()``). Its overhead over the
  floor: the receiver's embeddings (``wte`` + ``wpe``) and causal mask are recomputed every step, the skipped
  blocks are called (and return at once), and HuggingFace's forward bookkeeping runs.
- ``hook``: the hooked fallback (``modelstitch.suffix(receiver, layer, method="hook")``), the same call: the
  whole receiver runs on the input ids (without gradients up to the layer), the layer's output replaced.
- ``floor``: the least work, written by hand for GPT-2: ``hidden = stitch(rep)``, then the receiver's blocks
  after the layer, ``ln_f`` and ``lm_head``; the causal mask and position ids are built once outside the timer.
  The floor excludes the embeddings (the skip method recomputes them: part of its overhead).

Before timing, the script asserts that the floor's logits equal the skip suffix's on the same representation
(within 1e-4) and that the skip and hook methods give the same loss on the same inputs, so the three time equal
work. Methods are interleaved (rotating who goes first), each timed run does ``--steps`` steps from the same
initial stitch, ``--repeats`` runs are timed per method and the median seconds per step is kept. Printed and
written to ``--json``: seconds per step of each method, ``ratio_skip_to_floor`` (the target: <= 1.2) and
``ratio_hook_to_floor``, the config, torch and transformers versions, device, cpu count and threads.

Usage::

    python benchmarks/bench_lm_suffix.py [--device cpu|cuda|auto] [--json PATH] [--layers L] [--width W]

More options: ``--batch``, ``--seq-len``, ``--steps``, ``--repeats``, ``--lr``, ``--threads``. On a CPU shared with
other busy processes, ``--threads 1`` avoids the large stalls of intra-op thread pools that wait for a busy core.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelstitch as ms
from modelstitch.train import task_of

METHODS = ("skip", "hook", "floor")
TARGET_RATIO_SKIP_TO_FLOOR = 1.2
LOGITS_ATOL = 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpt2(args: argparse.Namespace, seed: int) -> nn.Module:
    """A small random GPT-2 language model of the benchmark's config (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=4,
        bos_token_id=255,  # within the byte vocabulary (GPT-2's default 50256 is not, and warns)
        eos_token_id=255,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


class Cell:
    """Everything the three methods share for one ``transformer.h.i -> transformer.h.j`` cell of a GPT-2 pair."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        if args.layers < 2:
            raise SystemExit("--layers must be at least 2 (the cell is h.{L//2 - 1} -> h.{L//2})")
        self.device, self.steps, self.lr = device, args.steps, args.lr
        self.sender = _gpt2(args, seed=0).to(device)
        self.receiver = _gpt2(args, seed=1).to(device)
        self.sender_layer = f"transformer.h.{args.layers // 2 - 1}"
        self.receiver_index = args.layers // 2
        self.receiver_layer = f"transformer.h.{self.receiver_index}"
        g = torch.Generator().manual_seed(0)
        self.batches = [  # one batch of random byte ids per step; every timed run sees the same ones
            _batch(torch.randint(0, 256, (args.batch, args.seq_len), generator=g), device) for _ in range(args.steps)
        ]
        torch.manual_seed(2)
        self.template = ms.stitch(
            self.sender,
            self.sender_layer,
            self.receiver,
            self.receiver_layer,
            example_input=self.batches[0],
            init="random",
            suffix_method="skip",
        )
        assert self.template.receiver_suffix.method == "skip", self.template.receiver_suffix
        self.hook_suffix = ms.suffix(self.receiver, self.receiver_layer, method="hook")
        self.initial = copy.deepcopy(self.template.stitch.state_dict())
        self.task = task_of(self.receiver)
        assert self.task.causal, "a GPT-2 LM head model should be a causal language model"
        with torch.no_grad():  # the sender's activations: computed once, outside every timer (the library's cache)
            self.provided = [self.template.provided_representation(x) for x in self.batches]
        self._floor_side = self._causal_side_inputs(self.batches[0])

    @property
    def name(self) -> str:
        """``"sender_layer->receiver_layer"``."""
        return f"{self.sender_layer}->{self.receiver_layer}"

    def fresh(self, method: str) -> ms.StitchedModel:
        """A `StitchedModel` of the cell with the initial stitch weights and the method's suffix."""
        t = self.template
        stitch = copy.deepcopy(t.stitch)
        stitch.load_state_dict(self.initial)
        return ms.StitchedModel(
            t.sender,
            t.receiver,
            stitch.to(self.device).train(),
            provided=t.provided,
            expected=t.expected,
            sender_prefix=t.sender_prefix,
            receiver_prefix=t.receiver_prefix,
            receiver_suffix=self.hook_suffix if method == "hook" else t.receiver_suffix,
        )

    # ------------------------------------------------------------------ the floor, by hand

    def _causal_side_inputs(self, x: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The causal mask and position ids GPT2Model.forward passes its blocks (built once, for the floor)."""
        from transformers.masking_utils import create_causal_mask

        model = self.receiver.transformer
        ids = x["input_ids"]
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        with torch.no_grad():
            embeds = model.wte(ids)
        # the keywords moved between transformers 5 releases: (input_embeds, cache_position, past_key_values) in
        # 5.17 and earlier, (inputs_embeds, cache) later; pass what this version names
        names = inspect.signature(create_causal_mask).parameters
        arguments = {
            "config": model.config,
            "inputs_embeds" if "inputs_embeds" in names else "input_embeds": embeds,
            "attention_mask": x["attention_mask"],
            "position_ids": position_ids,
            "cache" if "cache" in names else "past_key_values": None,
        }
        if "cache_position" in names:
            arguments["cache_position"] = position_ids[0]
        mask = create_causal_mask(**arguments)  # None under SDPA with no padding: causal by its is_causal flag
        return {"attention_mask": mask, "position_ids": position_ids}

    def floor_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The receiver from just after its layer: its later blocks, ``ln_f`` and ``lm_head`` (``[B, T, V]``)."""
        model, side = self.receiver, self._floor_side
        for block in model.transformer.h[self.receiver_index + 1 :]:
            hidden = block(hidden, None, side["attention_mask"], position_ids=side["position_ids"])
        return model.lm_head(model.transformer.ln_f(hidden))

    # ------------------------------------------------------------------ one timed run per method

    def _forward(self, method: str, m: ms.StitchedModel, rep: torch.Tensor, x: dict[str, torch.Tensor]) -> Any:
        if method == "floor":
            return self.floor_logits(m.stitch(rep))
        return m.receiver_suffix(m.adapt(rep), x)  # as the library's training loop (Plan.group_losses) calls it

    def run(self, method: str, steps: int | None = None) -> tuple[float, float]:
        """``steps`` training steps (default ``--steps``) of ``method``; returns ``(seconds, mean loss)``."""
        steps = self.steps if steps is None else steps
        m = self.fresh(method)
        optimizer = torch.optim.SGD(m.stitch.parameters(), lr=self.lr)
        losses = []
        with m.frozen():
            _sync(self.device)
            start = time.perf_counter()
            for i in range(steps):
                x, rep = self.batches[i % len(self.batches)], self.provided[i % len(self.provided)]
                loss = self.task.loss(self._forward(method, m, rep, x), x["input_ids"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            _sync(self.device)
            elapsed = time.perf_counter() - start
        return elapsed, float(torch.stack(losses).mean())

    # ------------------------------------------------------------------ equal work

    def check(self) -> dict[str, float]:
        """Assert the three methods compute the same thing; returns the differences seen."""
        m = self.fresh("skip")
        x, rep = self.batches[0], self.provided[0]
        with m.frozen(), torch.no_grad():
            hidden = m.adapt(rep)
            skip_logits = _logits(m.receiver_suffix(hidden, x))
            hook_logits = _logits(self.hook_suffix(hidden, x))
            floor_logits = self.floor_logits(hidden)
            logits = {"skip": skip_logits, "hook": hook_logits, "floor": floor_logits}
            losses = {k: float(self.task.loss(v, x["input_ids"])) for k, v in logits.items()}
        floor_diff = float((floor_logits - skip_logits).abs().max())
        hook_diff = float((hook_logits - skip_logits).abs().max())
        assert floor_diff <= LOGITS_ATOL, f"the floor's logits differ from the skip suffix's by {floor_diff:.3g}"
        assert abs(losses["skip"] - losses["hook"]) <= 1e-5 * max(1.0, abs(losses["hook"])), losses
        return {"floor_vs_skip_logits_max_abs": floor_diff, "hook_vs_skip_logits_max_abs": hook_diff, **losses}


def _batch(ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


# --------------------------------------------------------------------------- the benchmark


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--layers", type=int, default=6, help="blocks of both GPT-2s (default 6)")
    parser.add_argument("--width", type=int, default=128, help="n_embd of both GPT-2s (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed run (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each method; the median is kept")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the stitch (default 0.01)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes."""
    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = ms.core.resolve_device(args.device)
    cell = Cell(args, device)
    checks = cell.check()
    for method in METHODS:  # warm-up: kernel selection, allocator, lazy init
        cell.run(method, steps=min(2, args.steps))

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = METHODS[repeat % 3 :] + METHODS[: repeat % 3]  # interleave, rotating who goes first
        for method in order:
            seconds, losses[method] = cell.run(method)
            times[method].append(seconds / args.steps)
    per_step = {m: statistics.median(v) for m, v in times.items()}
    return {
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "config": {
            "model": "GPT2LMHeadModel",
            "vocab_size": 256,
            "layers": args.layers,
            "width": args.width,
            "heads": 4,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "repeats": args.repeats,
            "lr": args.lr,
            "cell": cell.name,
            "attn_implementation": cell.receiver.config._attn_implementation,
            "use_cache": cell.receiver.config.use_cache,  # GPT-2's default: the suffixes' forwards fill a KV cache
        },
        "seconds_per_step": per_step,
        "all_seconds_per_step": times,
        "ratio_skip_to_floor": per_step["skip"] / per_step["floor"],
        "ratio_hook_to_floor": per_step["hook"] / per_step["floor"],
        "mean_loss": losses,
        "checks": checks,
        "targets": {"ratio_skip_to_floor_max": TARGET_RATIO_SKIP_TO_FLOOR},
    }


def report(result: dict[str, Any]) -> str:
    """The human-readable table."""
    config = result["config"]
    per_step = result["seconds_per_step"]
    floor = per_step["floor"]
    lines = [
        f"device={result['device']} torch={result['torch']} transformers={result['transformers']} "
        f"cpus={result['cpu_count']} threads={result['threads']}",
        f"GPT-2 x2: {config['layers']} layers, width {config['width']}, batch {config['batch']} x {config['seq_len']} "
        f"tokens, cell {config['cell']}: {config['steps']} steps per run, median of {config['repeats']}",
        "",
        f"{'method':<8}{'ms/step':>12}{'x floor':>10}",
    ]
    for method in METHODS:
        lines.append(f"{method:<8}{per_step[method] * 1e3:>12.3f}{per_step[method] / floor:>10.2f}")
    ratio = result["ratio_skip_to_floor"]
    ok = "ok" if ratio <= TARGET_RATIO_SKIP_TO_FLOOR else "MISSED"
    lines += [
        "",
        f"ratio_skip_to_floor (skip / floor) = {ratio:.2f}   target <= {TARGET_RATIO_SKIP_TO_FLOOR}  [{ok}]",
        f"ratio_hook_to_floor (hook / floor) = {result['ratio_hook_to_floor']:.2f}",
        f"checks: floor vs skip logits max |diff| {result['checks']['floor_vs_skip_logits_max_abs']:.2g}, "
        f"skip loss {result['checks']['skip']:.5f}, hook loss {result['checks']['hook']:.5f}",
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
