"""Stitch a hand-written model whose block returns a tuple and which calls one module twice.

    python examples/custom_model.py [--quick] [--device auto|cpu|cuda]

`TwoPathNet` below has the two features that trip up hook-based tools:

- `block` returns a tuple ``(main, side)``, so "the output of `block`" has to
  say which tensor: ``output=1`` (on `capture`, `layer_specs`) or
  ``sender_output=1`` / ``receiver_output=1`` (on `stitch`) picks ``side``;
- `act` (one ``nn.ReLU``) runs twice per forward, once on each path, so it is
  addressed as ``"act:0"`` and ``"act:1"``; the bare name ``"act"`` is refused
  with a `StitchError` instead of silently picking one call.

The script lists the layers, captures ``block``'s second output, shows the
error for ``"act"``, trains two such networks briefly on the offline digits
dataset, stitches the sender's ``block`` (its ``side`` output) into the
receiver's ``"act:1"``, trains the stitch and prints the accuracies. With
``--quick`` (fewer epochs) it takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import modelstitch as ms
from modelstitch import data, zoo


class TwoPath(nn.Module):
    """A block with two outputs: a main path and a side path, as a tuple."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.side = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.main(x), self.side(x)


class TwoPathNet(nn.Module):
    """stem -> block (a tuple) -> act(main) + act(side) -> head; the one `act` module runs twice."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = TwoPath(width)
        self.act = nn.ReLU()  # one module, called on both paths
        self.head = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, side = self.block(self.stem(x))
        return self.head(self.act(main) + self.act(side))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    args = parser.parse_args()
    device = ms.core.resolve_device(args.device)
    start = time.perf_counter()

    train, test = data.digits(train=True), data.digits(train=False)
    example = train[0][0][None]  # one sample with its batch dimension: [1, 3, 32, 32]

    torch.manual_seed(0)
    sender, receiver = TwoPathNet(), TwoPathNet()

    print("== layers (module 'act' runs twice, so it has one name per call)")
    for spec in ms.layer_specs(receiver, example):
        print(f"  {spec.name:<14} {spec.layout or '-':<6} {spec.shape}  calls={spec.calls}")

    print("\n== capture: a tuple output; output=1 picks the second tensor")
    x = torch.stack([train[i][0] for i in range(4)])
    sender.eval()  # a plain forward in train mode would update BatchNorm statistics
    with ms.capture(sender, ["block", "act:1"], output={"block": 1}) as acts:
        sender(x)
    print("  ", acts)
    side = ms.activations(sender, x, ["block"], output=1)["block"]
    print("   activations(sender, x, ['block'], output=1)['block']:", tuple(side.shape))
    print("\n== the bare name of a module that runs twice is refused")
    try:
        ms.stitch(sender, "stem", receiver, "act", example_input=example)
    except ms.StitchError as err:
        print("   StitchError:", err)

    epochs = 5 if args.quick else 15
    recipe = zoo.CLASSIFIER_RECIPE.replace(batch_size=64, base_batch_size=64, lr=0.2, epochs=epochs)
    print(f"\n== train sender and receiver as classifiers ({epochs} epochs on {len(train)} digits)")
    for name, net, seed in [("sender", sender, 1), ("receiver", receiver, 2)]:
        result = zoo.train_classifier(
            net, train, recipe=recipe.replace(seed=seed), test_data=test, device=device, progress=False
        )
        print(f"   {name} test accuracy {result['test_accuracy']:.3f}")

    print("\n== stitch sender['block'] (its side output) into receiver['act:1']")
    stitched = ms.stitch(sender, "block", receiver, "act:1", example_input=example, sender_output=1)
    print("  ", stitched.extra_repr())
    print("   stitch:", stitched.stitch.core)
    # act(main) is computed before act:1 and used after it, so the receiver's graph cannot be cut at
    # act:1: the receiver runs its whole forward with act:1's output replaced (the "hook" suffix)
    print(f"   receiver suffix: {stitched.receiver_suffix.method!r} ({stitched.receiver_suffix.reason})")
    before = ms.evaluate(stitched, test, device=device)["accuracy"]
    stitch_epochs = 3 if args.quick else 8
    result = ms.train_stitch(
        stitched,
        train,
        recipe=ms.Recipe(batch_size=64, epochs=stitch_epochs),
        cache=True,
        device=device,
        progress=False,
    )
    after = ms.evaluate(stitched, test, device=device)["accuracy"]
    receiver_acc = ms.evaluate(receiver, test, device=device)["accuracy"]
    print(f"   {result.steps} steps, final training loss {result.final_loss:.3f}")
    print(f"   receiver accuracy         {receiver_acc:.3f}")
    print(f"   stitched, before training {before:.3f}")
    print(f"   stitched, after training  {after:.3f}")
    print(f"   stitching penalty         {receiver_acc - after:+.3f}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s on {device}")


if __name__ == "__main__":
    main()
