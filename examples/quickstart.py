"""Quickstart: stitch one torchvision ResNet18 into another and measure the stitching penalty.

    python examples/quickstart.py [--quick] [--device auto|cpu|cuda]

Two ResNet18s (``torchvision.models.resnet18(num_classes=10)``, no pretrained
weights, so nothing is downloaded) are trained briefly as classifiers on the
offline digits dataset (``modelstitch.data.digits()``: scikit-learn's 8x8
digits at 32x32). Then the *sender* runs up to ``layer3.1``, a trainable
stitch maps its output to the shape of the *receiver*'s ``layer2.0``, and the
receiver runs from there. Only the stitch trains.

It prints the receiver's own test accuracy, the stitched network's accuracy
before and after training the stitch, and the stitching penalty (receiver
accuracy minus stitched accuracy). With ``--quick`` the networks and the
stitch train on a 512-sample subset for a few epochs (well under a minute on
a CPU), so the numbers are rough; without it they use the whole training split
and more epochs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import modelstitch as ms
from modelstitch import data, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 512-sample subset and fewer epochs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    args = parser.parse_args()
    device = ms.core.resolve_device(args.device)
    start = time.perf_counter()

    train, test = data.digits(train=True), data.digits(train=False)
    if args.quick:
        train = data.subset(train, 512)
    net_epochs, stitch_epochs = (3, 2) if args.quick else (10, 4)

    torch.manual_seed(0)
    sender = torchvision.models.resnet18(num_classes=10)
    receiver = torchvision.models.resnet18(num_classes=10)

    # 1. Train both networks as classifiers (the stitch needs a receiver that does something).
    recipe = zoo.CLASSIFIER_RECIPE.replace(batch_size=64, base_batch_size=64, lr=0.02, epochs=net_epochs)
    for name, net, seed in [("sender", sender, 1), ("receiver", receiver, 2)]:
        result = zoo.train_classifier(
            net, train, recipe=recipe.replace(seed=seed), test_data=test, device=device, progress=False
        )
        print(f"{name:<8} resnet18: test accuracy {result['test_accuracy']:.3f} ({result['steps']} steps)")

    # 2. Stitch. example_input is a batch like the data: here one digit image, [1, 3, 32, 32].
    example_input = train[0][0][None]
    stitched = ms.stitch(sender, "layer3.1", receiver, "layer2.0", example_input=example_input)
    print(f"\nstitch {stitched.provided.shape} -> {stitched.expected.shape}:")
    print(stitched.stitch)
    print("receiver suffix:", stitched.receiver_suffix.method)

    # 3. Train the stitch only. cache=True computes the sender's activations once (no augmentation here).
    before = ms.evaluate(stitched, test, device=device)["accuracy"]
    result = ms.train_stitch(
        stitched,
        train,
        recipe=ms.Recipe(batch_size=64, epochs=stitch_epochs),
        cache=True,
        device=device,
        progress=False,
    )
    print(f"\ntrained the stitch: {result.steps} steps, epoch losses {[round(x, 3) for x in result.epoch_losses]}")

    # 4. Evaluate: the receiver alone, the stitched network, and their difference.
    receiver_accuracy = ms.evaluate(receiver, test, device=device)["accuracy"]
    stitched_accuracy = ms.evaluate(stitched, test, device=device)["accuracy"]
    penalty = ms.stitching_penalty(stitched, receiver, test, device=device)
    print(f"receiver accuracy           {receiver_accuracy:.3f}")
    print(f"stitched accuracy (before)  {before:.3f}")
    print(f"stitched accuracy (after)   {stitched_accuracy:.3f}")
    print(f"stitching penalty           {penalty:+.3f}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s on {device}")


if __name__ == "__main__":
    main()
