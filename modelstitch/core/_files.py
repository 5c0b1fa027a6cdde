"""`atomic_path`: the one way this library writes a file (unique temp name, fsync, rename).

`remove_orphans` deletes the temporary files of writers that died mid-write
(``kill -9``, a power cut): their names carry the writer's process id.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from .._errors import StitchError

__all__ = ["atomic_path", "remove_orphans", "write_text"]


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
    was; an `OSError` (a full disk, a read-only folder) becomes a
    `StitchError` naming the file. The temporary name is unique (process id and a random part), so concurrent writers of
    the same file never write into each other's temporary files. Missing
    parent folders are created.

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
        raise _cannot_write(path, err) from err
    # a fresh name, created by the writer itself so the file gets the usual permissions
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:_HEX]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cannot_write(path: Path, err: OSError) -> StitchError:
    return StitchError(
        f"could not write {path} ({err.strerror or err}); check that the folder is writable and the disk has "
        "room. Nothing was half-written: the previous file, if any, is intact"
    )


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
