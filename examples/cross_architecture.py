"""Stitch a vision transformer into a ResNet and a ResNet into a vision transformer.

    python examples/cross_architecture.py [--quick] [--device auto|cpu|cuda]

The sender and receiver need not share an architecture. A timm ViT-Tiny
(``vit_tiny_patch16_224``) gives *tokens*, ``[B, 197, 192]``: one class token
and a 14x14 grid of patch tokens. A torchvision ResNet18 gives *feature maps*,
``[B, C, H, W]``. The stitch converts between them:

- tokens -> map: drop the class token, lay the 196 patch tokens out as a
  ``[192, 14, 14]`` map, then the map -> map rule (here a 1x1 conv to the
  ResNet's 256 channels);
- map -> tokens: the map -> map rule to ``[192, 14, 14]``, then flatten the
  grid into 196 tokens and prepend their mean as the class token.

The script prints both networks' shapes at the stitched layers, the stitch
chosen in each direction, how the receiver's remaining part runs
(``receiver_suffix.method``: ``"graph"``, a cut of its torch.fx graph, or
``"hook"``, a full forward with the layer's output replaced), a forward pass,
and a few training steps on digits resized to 224x224 inside ``batch_fn``.

Both networks are untrained (no weights are downloaded), so the losses show
that gradients reach the stitch, not how similar the networks are. With
``--quick`` it trains for 2 epochs of 16 images (8 steps of batch 4) per
direction, since ViT-Tiny and ResNet18 at 224x224 are slow on a CPU; without
it, for 2 epochs of 256 images (batch 16), and it also evaluates on 128 test
images.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
import torchvision

import modelstitch as ms
from modelstitch import data


def to_224(batch):
    """batch_fn: digits come as [B, 3, 32, 32]; ViT-Tiny wants 224x224 (resize per batch, not per dataset)."""
    x, y = batch
    return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 8 steps per direction")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    args = parser.parse_args()
    device = ms.core.resolve_device(args.device)
    start = time.perf_counter()

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10).to(device)
    resnet = torchvision.models.resnet18(num_classes=10).to(device)

    n_train, n_test, batch = (16, 8, 4) if args.quick else (256, 128, 16)
    train = data.subset(data.digits(train=True), n_train)
    test = data.subset(data.digits(train=False), n_test)
    example = to_224((train[0][0][None], None))[0].to(device)  # [1, 3, 224, 224]

    print("== layer shapes (per sample)")
    wanted = {"blocks.5", "blocks.11", "layer3.0", "layer4.1"}
    for name, net in [("vit_tiny", vit), ("resnet18", resnet)]:
        for spec in ms.layer_specs(net, example):
            if spec.name in wanted:
                print(f"   {name}[{spec.name!r}]: {spec.layout:<6} {spec.shape}")

    directions = [
        ("vit_tiny['blocks.5'] -> resnet18['layer3.0']", vit, "blocks.5", resnet, "layer3.0"),
        ("resnet18['layer3.0'] -> vit_tiny['blocks.5']", resnet, "layer3.0", vit, "blocks.5"),
    ]
    # lr 0.01 at this small batch (the default quotes it at batch 256 and scales it down linearly)
    recipe = ms.Recipe(lr=0.01, batch_size=batch, base_batch_size=batch, epochs=2)
    for title, sender, sender_layer, receiver, receiver_layer in directions:
        print(f"\n== {title}")
        stitched = ms.stitch(sender, sender_layer, receiver, receiver_layer, example_input=example)
        print(f"   provided {stitched.provided.shape} -> expected {stitched.expected.shape}")
        print("   " + str(stitched.stitch).replace("\n", "\n   "))
        print(f"   receiver_suffix.method = {stitched.receiver_suffix.method!r}")
        x = example.expand(2, -1, -1, -1)
        print(f"   forward: input {tuple(x.shape)} -> logits {tuple(stitched(x).shape)}")
        t = time.perf_counter()
        result = ms.train_stitch(
            stitched, train, recipe=recipe, batch_fn=to_224, cache=True, device=device, progress=False
        )
        seconds = time.perf_counter() - t
        losses = ", ".join(f"{loss:.3f}" for loss in result.epoch_losses)
        print(f"   trained {result.steps} steps of batch {batch} in {seconds:.1f} s; epoch losses [{losses}]")
        if not args.quick:
            accuracy = ms.evaluate(stitched, test, batch_fn=to_224, device=device)["accuracy"]
            print(f"   test accuracy {accuracy:.3f} (untrained networks: expect about chance, 0.1)")

    print("\n== a cut inside a residual block: the skip connection crosses it, so the suffix is hooked")
    inner = ms.stitch(vit, "blocks.5", resnet, "layer3.0.conv1", example_input=example)
    print(f"   resnet18['layer3.0.conv1']: method {inner.receiver_suffix.method!r}")
    print(f"   reason: {inner.receiver_suffix.reason}")
    # The same cell run both ways: suffix_method="hook" forces the fallback, for comparison.
    x = example.expand(4, -1, -1, -1)
    timings = {}
    for method in ("graph", "hook"):
        model = ms.stitch(vit, "blocks.5", resnet, "layer3.0", example_input=example, suffix_method=method)
        with torch.no_grad():
            model(x)  # warm up
            t = time.perf_counter()
            model(x)
            timings[method] = time.perf_counter() - t
    print(
        f"   vit_tiny['blocks.5'] -> resnet18['layer3.0'], one forward of 4 images: graph suffix "
        f"{timings['graph'] * 1000:.0f} ms, hook suffix {timings['hook'] * 1000:.0f} ms "
        "(the hook reruns the receiver's layers before the cut)"
    )
    print(f"\ndone in {time.perf_counter() - start:.1f} s on {device}")


if __name__ == "__main__":
    main()
