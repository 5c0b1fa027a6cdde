"""Layer addresses: ``"layer3.1"``, ``"input"`` and ``"name:k"`` for the k-th call of a module.

A *layer address* is a module path from ``model.named_modules()``
(``"layer3.1"``), the special name ``"input"`` (the model's first input), or
``"name:k"`` for the k-th call (0-based) of a module that runs more than once
per forward, such as the ``relu`` that torchvision's ``BasicBlock`` reuses.
"""

from __future__ import annotations

import dataclasses
import difflib

from torch import nn

from .._errors import StitchError

__all__ = ["INPUT", "Address", "list_layers", "missing_call_error", "parse_address", "repeated_call_error"]

INPUT = "input"


@dataclasses.dataclass(frozen=True)
class Address:
    """A parsed layer address.

    Attributes:
        name: the module path (``""`` never appears; ``"input"`` is special).
        call: the 0-based call index from ``"name:k"``, or ``None`` for a bare
            name (which must run exactly once per forward).
    """

    name: str
    call: int | None = None

    def __str__(self) -> str:
        return self.name if self.call is None else f"{self.name}:{self.call}"

    @property
    def is_input(self) -> bool:
        """Whether this is the special ``"input"`` address."""
        return self.name == INPUT


def list_layers(model: nn.Module) -> list[str]:
    """Every layer address that `capture` and `stitch` accept for ``model``.

    ``"input"`` first, then every submodule path in definition order. A
    module that runs several times per forward is addressed ``"name:k"``; use
    `layer_specs` to see which do.

    Args:
        model: any ``nn.Module``.

    Returns:
        Layer names, e.g. ``["input", "conv1", "bn1", ..., "fc"]``.

    Examples:
        >>> list_layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
        ['input', '0', '1']
    """
    return [INPUT] + [name for name, _ in model.named_modules() if name]


def parse_address(model: nn.Module, layer: str) -> Address:
    """Validate ``layer`` against ``model`` and split off a ``":k"`` call index.

    Raises:
        StitchError: the name is not a layer of ``model`` (the message lists the
            closest valid names), the call index is not a non-negative int, or
            ``model`` is a ``torch.compile`` wrapper (whose modules run without
            hooks; pass ``model._orig_mod``).

    >>> parse_address(nn.Sequential(nn.ReLU()), "0:1")
    Address(name='0', call=1)
    """
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, nn.Module):
        raise StitchError(
            f"{type(model).__name__} is a torch.compile wrapper, whose layers run without the hooks modelstitch "
            "needs: pass model._orig_mod (the original module; it shares the weights)"
        )
    if not isinstance(layer, str):
        raise StitchError(f"a layer address is a string such as 'layer3.1', got {layer!r} ({type(layer).__name__})")
    name, sep, call_text = layer.rpartition(":")
    if not sep:
        name, call = layer, None
    else:
        try:
            call = int(call_text)
        except ValueError:
            call = -1
        if call < 0:
            raise StitchError(f"layer {layer!r}: the part after ':' must be a call index 0, 1, 2, ... (e.g. 'relu:1')")
    if name == INPUT:
        if call is not None:
            raise StitchError(f"layer {layer!r}: 'input' takes no call index")
        return Address(INPUT)
    if not name or not _has_submodule(model, name):
        close = difflib.get_close_matches(name, list_layers(model), n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            hint += f" The model is a {type(model).__name__} wrapper: pass model.module instead."
        raise StitchError(
            f"{type(model).__name__} has no layer {name!r}.{hint} "
            "modelstitch.list_layers(model) lists every valid name."
        )
    return Address(name, call)


def _has_submodule(model: nn.Module, name: str) -> bool:
    # walks the dotted path only: cheap enough for every forward of a prefix
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def repeated_call_error(name: str, calls: int | None = None) -> StitchError:
    """The error for a bare name whose module runs ``calls`` (> 1, or unknown) times per forward."""
    if calls:
        which = f"runs {calls} times per forward; address one call as '{name}:0' ... '{name}:{calls - 1}'"
    else:
        which = f"runs more than once per forward; address one call as '{name}:0', '{name}:1', ..."
    return StitchError(f"module {name!r} {which} (modelstitch.layer_specs(model, example_input) lists them)")


def missing_call_error(address: Address, calls: int) -> StitchError:
    """The error for ``"name:k"`` when the module ran only ``calls <= k`` times."""
    valid = f"'{address.name}:0' ... '{address.name}:{calls - 1}'" if calls else "none"
    return StitchError(
        f"layer {str(address)!r}: module {address.name!r} runs {calls} time(s) per forward; valid calls: {valid}"
    )
