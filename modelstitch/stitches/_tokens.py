"""What a vision transformer reports about its token sequence: prefix tokens and the patch grid.

`make_stitch` reads a ``[N, D]`` token side as ``p`` prefix (class/register)
tokens followed by a ``gh x gw`` grid of patch tokens. Without help it can only
guess ``p = N - floor(sqrt(N))**2`` and a square grid, which is wrong for a
rectangular grid (``1 + 4x6 = 25`` tokens would read as ``0 + 5x5``).
`token_layout` reads the true layout off the model instead.
"""

from __future__ import annotations

from torch import nn

__all__ = ["TokenLayout", "token_layout"]

#: ``(prefix count p, (grid_h, grid_w))``: ``N = p + grid_h * grid_w`` tokens, prefix first, patches row-major.
TokenLayout = tuple[int, tuple[int, int]]

# timm VisionTransformer modules whose output is the full token sequence [B, p + gh*gw, D] (prefix included)
_STACK = ("pos_drop", "patch_drop", "norm_pre", "blocks", "norm")
# modules inside patch_embed whose output is the flattened patch tokens [B, gh*gw, D] (no prefix yet)
_PATCH_TOKENS = ("patch_embed", "patch_embed.norm")


def _is_count(x: object, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_grid(x: object) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_count(s, 1) for s in x)


def _dynamic(model: nn.Module, embed: nn.Module) -> bool:
    """Whether the patch grid depends on the input size (timm's ``dynamic_img_size``)."""
    return bool(
        getattr(model, "dynamic_img_size", False)
        or getattr(embed, "dynamic_img_size", False)
        or getattr(embed, "strict_img_size", True) is False
        or getattr(embed, "img_size", ()) is None
    )


def _feature_modules(model: nn.Module) -> list[str]:
    """The ``module`` names of timm's ``feature_info`` (the token stack's blocks for a ViT)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return []
    return [entry["module"] for entry in info if isinstance(entry, dict) and isinstance(entry.get("module"), str)]


def token_layout(model: nn.Module, layer: str) -> TokenLayout | None:
    """The token layout ``(p, (gh, gw))`` that ``model`` reports for the output of ``layer``, or ``None``.

    For timm vision transformers (``VisionTransformer`` and the models built
    like it: DeiT, BEiT, EVA, ...) the prefix count is ``model.num_prefix_tokens``
    (class plus register tokens; ``no_embed_class`` does not change it) and the
    grid is ``model.patch_embed.grid_size``. A layer in the token stack
    (``pos_drop``, ``patch_drop``, ``norm_pre``, ``blocks`` and everything in
    them, ``norm``, and the modules of ``model.feature_info``) outputs
    ``[B, p + gh*gw, D]`` and gets ``(p, (gh, gw))``; ``patch_embed`` (and
    ``patch_embed.norm``) outputs the patch tokens alone, ``[B, gh*gw, D]``,
    and gets ``(0, (gh, gw))``.

    ``None`` when the model reports nothing: no ``num_prefix_tokens`` or no
    ``patch_embed.grid_size`` (ResNets, Swin, Hiera, ...), a grid that depends
    on the input (``dynamic_img_size=True``), the ``"input"`` address, and
    layers whose output is not the token sequence (``patch_embed.proj`` is a
    ``[B, D, gh, gw]`` map; ``fc_norm``, ``head_drop`` and ``head`` are vectors).

    The model is not run, so the layout is a claim about ``layer``'s output,
    not a measurement: `make_stitch` (``token_layouts=``) uses it only for a
    side that is ``[N, D]`` tokens with ``N == p + gh*gw`` and otherwise reads
    that side as if nothing had been reported.

    Args:
        model: any ``nn.Module``; only timm-style attributes are read.
        layer: a layer address (``"blocks.3"``; a call index ``"name:k"`` is allowed).

    Returns:
        ``(p, (gh, gw))``, or ``None``.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=2, num_classes=10)
        >>> token_layout(vit, "blocks.1"), token_layout(vit, "patch_embed"), token_layout(vit, "head")
        ((1, (4, 6)), (0, (4, 6)), None)
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if not _is_count(prefix, 0) or not isinstance(embed, nn.Module) or not _is_grid(grid) or _dynamic(model, embed):
        return None
    name = str(layer)
    base, sep, call = name.rpartition(":")
    if sep and call.isdigit():
        name = base
    gh, gw = grid
    if name in _PATCH_TOKENS:
        return (0, (gh, gw)) if getattr(embed, "flatten", False) is True else None
    stack = [*_STACK, *_feature_modules(model)]
    if any(name == module or name.startswith(f"{module}.") for module in stack):
        return prefix, (gh, gw)
    return None
