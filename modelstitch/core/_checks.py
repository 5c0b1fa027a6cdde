"""Checking a setting where it enters: `Allowed` says what a value may be, in words and as a test.

The command line, a study file's keys, `PresetOptions` and `Study` check their
settings with these, so the messages read the same everywhere:
``"<what> must be <allowed>, got <value>"``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import StitchError

__all__ = [
    "BOOLEAN",
    "PATH",
    "SEED",
    "TEXT",
    "Allowed",
    "check_names",
    "choice",
    "duplicates",
    "integer",
    "number",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _anything(value: Any) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What one setting may be, in words and as a test: the check a flag, a TOML key and an option share.

    Attributes:
        kind: the type in words (``"an int"``, ``"a number"``, ``"true or false"``).
        is_kind: whether a value has that type.
        bounds: the range in words (``" >= 1"``, ``" in [0, 1)"``); empty for any value of the type.
        in_bounds: whether a value of the type is in range.
        none: what ``None`` means where it is allowed (``"all pairs"``); empty where it is not.
        convert: reads the setting from command-line text (``int``, ``float``, ``str``).
    """

    kind: str
    is_kind: Callable[[Any], bool]
    bounds: str = ""
    in_bounds: Callable[[Any], bool] = _anything
    none: str = ""
    convert: Callable[[str], Any] = str

    def words(self, *, with_none: bool = True) -> str:
        """What is allowed, e.g. ``"an int >= 1, or None (all pairs)"``."""
        text = f"{self.kind}{self.bounds}"
        return f"{text}, or None ({self.none})" if self.none and with_none else text

    def or_none(self, meaning: str) -> Allowed:
        """The same, and ``None``, which means ``meaning``."""
        return dataclasses.replace(self, none=meaning)

    def problem(self, value: Any, *, with_none: bool = True) -> str | None:
        """``"must be an int >= 1, got -1"`` when ``value`` is not allowed, else ``None``."""
        if value is None and self.none:
            return None
        if not self.is_kind(value):
            return f"must be {self.words(with_none=with_none)}, got {value!r}"
        if _is_number(value) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if not self.in_bounds(value):
            return f"must be {self.words(with_none=with_none)}, got {value!r}"
        return None

    def check(self, value: Any, what: str) -> None:
        """Refuse ``value`` unless it is allowed.

        Raises:
            StitchError: ``"<what> must be <allowed>, got <value>"``.
        """
        problem = self.problem(value)
        if problem is not None:
            raise StitchError(f"{what} {problem}")

    def parse(self, text: str) -> Any:
        """The value a command-line argument gives.

        Raises:
            StitchError: the text is not of the kind or out of range (the message has no field name:
                the command line adds the flag's).
        """
        try:
            value = self.convert(text)
        except ValueError:
            raise StitchError(f"must be {self.words(with_none=False)}, got {text!r}") from None
        problem = self.problem(value, with_none=False)
        if problem is not None:
            raise StitchError(problem)
        return value


def integer(minimum: int | None = None) -> Allowed:
    """An int (not a bool), ``>= minimum``."""
    if minimum is not None:
        return Allowed("an int", _is_int, f" >= {minimum}", lambda v: v >= minimum, convert=int)
    return Allowed("an int", _is_int, convert=int)


def number(*, above: float | None = None, at_least: float | None = None, below: float | None = None) -> Allowed:
    """A finite int or float (not a bool): ``> above`` or ``>= at_least``, and ``< below``."""
    if at_least is not None and below is not None:
        bounds = f" in [{at_least}, {below})"
    elif above is not None:
        bounds = f" > {above}"
    elif at_least is not None:
        bounds = f" >= {at_least}"
    else:
        bounds = ""

    def in_bounds(v: Any) -> bool:
        low = (above is None or v > above) and (at_least is None or v >= at_least)
        return low and (below is None or v < below)

    return Allowed("a number", _is_number, bounds, in_bounds, convert=float)


def choice(options: Sequence[str]) -> Allowed:
    """One of ``options`` (strings)."""
    return Allowed(f"one of {', '.join(map(repr, options))}", lambda v: isinstance(v, str) and v in options)


BOOLEAN = Allowed("true or false", lambda v: isinstance(v, bool))
TEXT = Allowed("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
PATH = Allowed("a path", lambda v: isinstance(v, os.PathLike) or (isinstance(v, str) and bool(v.strip())))
SEED = Allowed("an int", _is_int, " in [0, 2**62]", lambda v: 0 <= v <= 2**62, convert=int)
"""Seeds: what `Recipe.seed` takes, with room for the offsets added per network and data split."""


def duplicates(items: Sequence[Any]) -> list[Any]:
    """The items that occur more than once, in order of their second occurrence."""
    seen: list[Any] = []
    again: list[Any] = []
    for item in items:
        if item in seen and item not in again:
            again.append(item)
        seen.append(item)
    return again


def check_names(value: Any, what: str, *, noun: str, example: str) -> list[str]:
    """``value`` as a list of names: a non-empty list of non-empty strings, none repeated.

    Args:
        value: what the caller gave.
        what: names the setting in the message (``"study.toml: [networks.a] layers"``).
        noun: what one name is (``"layer"``).
        example: a valid value, for the message (``"['stem', 'layer1.0']"``).

    Raises:
        StitchError: one string instead of a list (the message shows it as a list of one), an empty list, a
            name that is not a string, or a repeat.
    """
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(TEXT.is_kind(v) for v in value):
        hint = f"; for one {noun} write [{value!r}]" if isinstance(value, str) else ""
        raise StitchError(f"{what} must be a list of {noun} names such as {example}, got {value!r}{hint}")
    if not value:
        raise StitchError(f"{what} is empty: name at least one {noun}, e.g. {example}")
    repeated = duplicates(list(value))
    if repeated:
        raise StitchError(f"{what} names {noun} {repeated[0]!r} more than once")
    return list(value)
