"""Stitch torchvision and timm models into each other, by layer name.

    python examples/stitch_anything.py [--device auto|cpu|cuda]

Builds untrained networks (no download), so it shows the mechanics: layer
names, shapes, the stitch chosen for each pair, and a forward pass.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torchvision

import modelstitch as ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry with the other examples")
    args = parser.parse_args()
    device = ms.core.resolve_device(args.device)

    a = torchvision.models.resnet18(num_classes=10).to(device)
    b = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.randn(8, 3, 32, 32, device=device)

    print("first layers of resnet18:", ms.list_layers(a)[:6])
    specs = ms.layer_specs(a, torch.randn(1, 3, 32, 32, device=device))
    print("layer2.0 ->", next(s for s in specs if s.name == "layer2.0"))

    with ms.capture(a, ["layer1.0", "layer4"]) as acts:
        a(x)
    print("captured:", acts)

    stitched = ms.stitch(a, "layer3.1", b, "layer2.0", example_input=torch.randn(2, 3, 32, 32))
    print("resnet18[layer3.1] -> resnet18[layer2.0]:", tuple(stitched(x).shape))
    print(stitched.stitch)

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10).to(device)
    big = torch.randn(2, 3, 224, 224, device=device)
    tokens_to_map = ms.stitch(vit, "blocks.5", b, "layer3.0", example_input=big)
    print("vit[blocks.5] -> resnet18[layer3.0]:", tokens_to_map.provided.shape, "->", tokens_to_map.expected.shape)
    print("  logits", tuple(tokens_to_map(big).shape), "suffix:", tokens_to_map.receiver_suffix.method)
    map_to_tokens = ms.stitch(b, "layer3.0", vit, "blocks.5", example_input=big)
    print("resnet18[layer3.0] -> vit[blocks.5]:", map_to_tokens.provided.shape, "->", map_to_tokens.expected.shape)
    print("  logits", tuple(map_to_tokens(big).shape), "suffix:", map_to_tokens.receiver_suffix.method)


if __name__ == "__main__":
    main()
