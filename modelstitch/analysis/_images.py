"""`generate_images`: stitch every sender layer into the receiver's ``"input"`` (the paper's Figure 6)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core import as_loader, atomic_path, iterate_batches
from ..data import denormalize
from ..stitches import stitch as make_stitched
from ..study import Study
from ..study._results import slug
from ..train import Recipe, evaluate_stitches, train_stitches

__all__ = ["generate_images"]


def generate_images(
    study: Study,
    sender: str,
    receiver: str,
    *,
    path: str | Path | None = None,
    recipe: Recipe | None = None,
    n_images: int = 6,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Stitch every sender layer into the receiver's ``"input"`` and save a grid of images.

    Each stitch is trained with the task objective through the whole receiver,
    so it learns to *generate* an input the receiver classifies correctly. The
    grid has one row per sender layer: generated images beside the originals,
    de-normalised for display.

    Args:
        study: the study whose networks and data to use.
        sender: the sender network's name.
        receiver: the receiver network's name.
        path: the PNG (default ``out/analysis/images_<sender>__<receiver>.png``).
        recipe: training recipe (default: the study's).
        n_images: test images shown per row.
        mean: per-channel mean for de-normalising (default: the dataset's
            ``.mean`` attribute, else no de-normalisation).
        std: per-channel std, likewise.
        progress: show progress bars.

    Returns:
        ``{sender_layer: accuracy of the image-generating stitched network}``.
    """
    sender_model, receiver_model = study.models[sender], study.models[receiver]
    example = study.example_input
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(study.seed)
        stitched = [
            make_stitched(sender_model, layer, receiver_model, "input", example_input=example)
            for layer in study.layers[sender]
        ]
    train_stitches(
        stitched,
        study.train_data,
        recipe=recipe or study.recipe,
        device=study.device,
        progress=progress,
        cache=study.cache,
    )
    accuracy = evaluate_stitches(stitched, study.test_data, device=study.device)
    loader = as_loader(study.test_data, batch_size=n_images, shuffle=False)
    x, _ = next(iter(iterate_batches(loader, study.device)))
    mean = mean if mean is not None else getattr(study.test_data, "mean", None)
    std = std if std is not None else getattr(study.test_data, "std", None)

    def show(images: torch.Tensor) -> np.ndarray:
        images = images.detach().float().cpu()
        if mean is not None and std is not None:
            images = denormalize(images, mean, std)
        return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    rows = []
    with torch.no_grad():
        for model in stitched:
            rows.append((model.sender_layer, show(model.stitch(model.provided_representation(x))), show(x)))
    path = Path(path) if path else study.out / "analysis" / f"images_{slug(sender)}__{slug(receiver)}.png"
    _save_image_grid(rows, path, title=f"{sender} layers -> {receiver} input (generated | original)")
    return {m.sender_layer: r["accuracy"] for m, r in zip(stitched, accuracy)}


def _save_image_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, *, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = rows[0][1].shape[0]
    fig = Figure(figsize=(2 * n * 0.9, len(rows) * 0.95 + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 2 * n, squeeze=False)
    for r, (label, generated, original) in enumerate(rows):
        for k in range(n):
            for col, image in ((2 * k, generated[k]), (2 * k + 1, original[k])):
                ax = axes[r][col]
                ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r][0].set_ylabel(f"{r} {label}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
