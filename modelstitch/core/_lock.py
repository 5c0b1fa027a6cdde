"""`folder_lock`: one process at a time in a run folder (an advisory lock on ``<folder>/.lock``)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .._errors import StitchError
from ._files import remove_orphans

__all__ = ["folder_lock"]

_held: dict[Path, int] = {}  # folders this process holds, with how many nested holders
_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], *, wait: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock inside the block; nested use in one process is fine.

    The lock is ``fcntl.flock`` on ``<folder>/.lock``: the operating system
    releases it when the process ends, however it ends (``kill -9`` included),
    so a crashed run never leaves a stale lock. Taking the lock also deletes
    the temporary files that writers killed mid-write left in the folder
    (`remove_orphans`). On platforms without ``fcntl`` the block runs unlocked.

    Args:
        folder: the run folder (created if missing).
        wait: wait for another process to release the lock instead of failing.

    Raises:
        StitchError: another process holds the lock and ``wait`` is False.
    """
    path = Path(folder).resolve()
    with _guard:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _guard:
                _held[path] -= 1
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / ".lock", "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as err:
        raise StitchError(
            f"cannot use {path} as a run folder ({err.strerror or err}); choose a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise StitchError(
                f"another process (pid {owner}) is running in {path}; wait for it to finish, pass wait=True "
                "(--wait) to queue behind it, or use another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        with _guard:
            _held[path] = 1
        try:
            remove_orphans(path)
            yield
        finally:
            with _guard:
                del _held[path]
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
