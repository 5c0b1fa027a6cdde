"""The library's one exception type."""

from __future__ import annotations

__all__ = ["StitchError", "StitchWarning", "first_line"]


class StitchError(ValueError):
    """Raised for anything a caller asked for that the library cannot do.

    The message names what was wrong (a layer name, a pair of shapes, an
    option) and, where there is one, how to fix it. It subclasses
    :class:`ValueError`, so code that already catches bad arguments keeps
    working.
    """


class StitchWarning(UserWarning):
    """Issued when a result may not mean what it seems: a failed self-stitch, a mismatched control, too few steps."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for wrapping it."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
