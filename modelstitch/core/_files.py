"""`atomic_path`: the one way this library writes a file (unique temp name, fsync, rename).

`remove_orphans` deletes the temporary files of writers that died mid-write
(``kill -9``, a power cut): their names carry the writer's process id.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from .._errors import StitchError

__all__ = ["atomic_path", "remove_orphans", "write_error", "write_text"]


_HEX = 12  # random hex digits in a temporary name
# ".<stem>.<pid>.<hex>.tmp<suffix>", as atomic_path names them
_TEMP_NAME = re.compile(rf"^\..*\.(\d+)\.[0-9a-f]{{{_HEX}}}\.tmp(\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``.

    Write the file at the yielded path. When the block ends without an
    exception the temporary file is flushed to disk (``fsync``) and renamed
    over ``path`` in one step, so readers see the old file or the new one,
    never half of one. On an exception it is deleted and ``path`` is left as it
    was. A failed write (a full disk, a read-only or immutable folder) raised
    as an `OSError`, or as the `safetensors.SafetensorError` that
    ``safetensors.torch.save_file`` raises for one, becomes a `StitchError`
    naming the file and the operating system's reason (see `write_error`).
    The temporary name is unique (process id and a random part), so
    concurrent writers of the same file never write into each other's
    temporary files. Missing parent folders are created.

    Examples:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('done', ['a.txt'])
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from err
    # a fresh name, created by the writer itself so the file gets the usual permissions
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:_HEX]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        _discard(tmp)
        failure = _os_error(err)
        if failure is None:  # a SafetensorError that is no I/O error: a bug, not the disk
            raise
        raise write_error(path, failure) from err
    except BaseException:
        _discard(tmp)
        raise


def write_error(path: str | os.PathLike[str], err: OSError) -> StitchError:
    """The `StitchError` for a failed write of ``path``: the file, the OS reason and what to do.

    Args:
        path: the file that could not be written.
        err: the operating system's error (its ``errno`` picks the advice).

    Returns:
        The error to raise (``raise write_error(path, err) from err``).

    Examples:
        >>> import errno
        >>> str(write_error("run/y.safetensors", OSError(errno.ENOSPC, "No space left on device")))[:93]
        'could not write run/y.safetensors: No space left on device (free some space or choose another'
    """
    reason = err.strerror or str(err)
    if err.errno in _FULL:
        advice = "free some space or choose another output folder"
    elif err.errno in _NOT_WRITABLE:
        advice = "the folder is read-only or not writable: make it writable or choose another output folder"
    elif err.errno in _IN_THE_WAY:
        advice = "a folder or file is in the way of that path: move it or choose another path"
    else:
        advice = "check that the folder is writable and the disk has room"
    return StitchError(
        f"could not write {path}: {reason} ({advice}); nothing was half-written: the previous file, if any, is intact"
    )


_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_IN_THE_WAY = {errno.EISDIR, errno.ENOTDIR, errno.EEXIST}
# how safetensors' Rust side words an I/O error: "... I/O error: No space left on device (os error 28) ..."
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _os_error(err: OSError | SafetensorError) -> OSError | None:
    """``err`` as an `OSError`: a `SafetensorError` carries the errno only in its message (None if it has none)."""
    if isinstance(err, OSError):
        return err
    match = _OS_ERROR.search(str(err))
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number))


def _discard(tmp: Path) -> None:
    """Delete a temporary file if it exists; a folder that refuses even that (read-only) keeps nothing of it anyway."""
    with contextlib.suppress(OSError):  # unlink on a read-only file system fails even for a missing file
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def remove_orphans(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that `atomic_path` writers left in ``folder`` when they died.

    A writer killed between creating its temporary file and renaming it (``kill
    -9``, an out-of-memory kill, a power cut) leaves the file behind; the target
    itself is intact. A temporary file is an orphan when the process named in it
    is no longer running on this machine, so files of live local writers
    (another process plotting into the same folder) are kept; a folder shared
    between machines should be written by one machine at a time. POSIX only:
    elsewhere nothing is removed.

    Args:
        folder: searched with its subfolders; a missing folder has no orphans.

    Returns:
        The paths removed.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return []
    removed = []
    for candidate in Path(folder).rglob(".*.tmp*"):
        match = _TEMP_NAME.match(candidate.name)
        if match and candidate.is_file() and not _running(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
