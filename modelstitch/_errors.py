"""The library's one exception type."""

from __future__ import annotations

__all__ = ["StitchError"]


class StitchError(ValueError):
    """Raised for anything a caller asked for that the library cannot do.

    The message names what was wrong (a layer name, a pair of shapes, an
    option) and, where there is one, how to fix it. It subclasses
    :class:`ValueError`, so code that already catches bad arguments keeps
    working.
    """
