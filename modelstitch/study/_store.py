"""`ResultStore`: a study's results in one SQLite file (stdlib ``sqlite3``, WAL mode).

A row is one finished cell. Rows of cells trained together are written in
one transaction, so a process killed at any moment leaves either all of them
or none: nothing half-written is ever read back. Every read-modify-write runs
in a ``BEGIN IMMEDIATE`` transaction, so two processes never interleave one.
A store records its schema version; a file written by another layout is
refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._errors import StitchError
from ..core import atomic_path
from ..core._files import write_error
from ..train import SCORES

__all__ = [
    "CELL_COLUMNS",
    "DISTANCE_COLUMNS",
    "MEASURE_COLUMNS",
    "SCHEMA_VERSION",
    "SCORE_COLUMNS",
    "ResultStore",
    "read_run_meta",
]

SCHEMA_VERSION = 3
"""Layout of the tables; 1 was modelstitch 0.1 (no ``weights`` column, no schema record); 2 had no
`SCORE_COLUMNS` and no ``convergence``.

A version-2 store is brought to version 3 when it is opened: its score columns are added, empty.
"""

KEY_COLUMNS = ("sender", "sender_layer", "receiver", "receiver_layer", "objective")
CELL_COLUMNS = (
    *KEY_COLUMNS,
    "sender_index",
    "receiver_index",
    "sender_depth",
    "receiver_depth",
    "accuracy",
    "loss",
    "train_loss",
    "init_accuracy",
    "selected_epoch",
    "holdout_accuracy",
    "convergence",
    "seconds",
    "seed",
    "recipe",
    "version",
    "created",
    "weights",
)
SCORE_COLUMNS = tuple(s for s in SCORES if s not in ("accuracy", "loss"))
"""The scores of `modelstitch.train.score_stitches` beside accuracy and loss: empty unless the study asked for them."""
CELL_COLUMNS = (*CELL_COLUMNS, *SCORE_COLUMNS)
MEASURE_COLUMNS = ("sender", "sender_layer", "receiver", "receiver_layer", "measure", "value")
"""Columns of the ``measures`` table: one similarity-measure value of one cell (objective-independent)."""

_TYPES = {
    "sender_index": "INTEGER",
    "receiver_index": "INTEGER",
    "sender_depth": "INTEGER",
    "receiver_depth": "INTEGER",
    "accuracy": "REAL",
    "loss": "REAL",
    "train_loss": "REAL",
    "init_accuracy": "REAL",
    "selected_epoch": "REAL",
    "holdout_accuracy": "REAL",
    "seconds": "REAL",
    "seed": "INTEGER",
    **{c: "REAL" for c in SCORE_COLUMNS},
}

DISTANCE_METRICS = ("EV", "ES", "SV")
"""Distances of the paper's MSE analysis: expected vs task-trained (EV), vs MSE-trained (ES), and between them (SV)."""
STAT_FIELDS = ("n", "total", "total_sq", "minimum", "maximum")
DISTANCE_COLUMNS = (
    "sender",
    "sender_layer",
    "receiver",
    "receiver_layer",
    "sender_index",
    "receiver_index",
    "control",
    *(f"{m}_{f}" for m in DISTANCE_METRICS for f in STAT_FIELDS),
)


class ResultStore:
    """The SQLite file that holds a study's finished cells.

    Args:
        path: the database file (created with its folder if missing).

    Examples:
        >>> import tempfile, os
        >>> store = ResultStore(os.path.join(tempfile.mkdtemp(), "s.sqlite"))
        >>> store.add([{"sender": "A", "sender_layer": "stem", "receiver": "B", "receiver_layer": "stem",
        ...             "objective": "task", "accuracy": 0.5}])
        >>> store.done()
        {('A', 'stem', 'B', 'stem', 'task')}
        >>> store.close()
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode: every transaction is explicit (see `transaction`)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as err:
            raise StitchError(f"cannot open the store {self.path} ({err}); choose a writable folder") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create_tables()
        except sqlite3.DatabaseError as err:
            self._db.close()
            if isinstance(err, sqlite3.OperationalError) and _write_failure(err, opening=True) is not None:
                # a sound store in a folder that cannot be written (read-only, full): WAL mode must write beside it
                raise StitchError(f"cannot open the store {self.path} ({err}); choose a writable folder") from None
            raise StitchError(f"{self.path} is not a readable modelstitch store ({err}); use another folder") from None
        except BaseException:
            self._db.close()
            raise

    def _create_tables(self) -> None:
        with self.transaction() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if "meta" in tables else None
                version = json.loads(row[0]) if row else 1
                if version == 2:  # new in 3: the score columns and convergence, added empty; the rows stay
                    for c in (*SCORE_COLUMNS, "convergence"):
                        db.execute(f"ALTER TABLE cells ADD COLUMN {c} {_TYPES.get(c, 'TEXT')}")
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (json.dumps(SCHEMA_VERSION),))
                    version = SCHEMA_VERSION
                if version != SCHEMA_VERSION:
                    raise StitchError(
                        f"{self.path} was written by another version of modelstitch (store schema {version}, this "
                        f"version reads {SCHEMA_VERSION}); use a new output folder, or rerun with the version "
                        "that made it"
                    )
            columns = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in CELL_COLUMNS)
            db.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns}, PRIMARY KEY ({', '.join(KEY_COLUMNS)}))")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS failures (sender TEXT, receiver TEXT, objective TEXT, error TEXT, "
                "attempts INTEGER, created TEXT, PRIMARY KEY (sender, receiver, objective))"
            )
            stats = ", ".join(f"{c} REAL" for c in DISTANCE_COLUMNS[7:])
            db.execute(
                "CREATE TABLE IF NOT EXISTS distances (sender TEXT, sender_layer TEXT, receiver TEXT, "
                f"receiver_layer TEXT, sender_index INTEGER, receiver_index INTEGER, control INTEGER, {stats}, "
                "PRIMARY KEY (sender, sender_layer, receiver, receiver_layer))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS measures (sender TEXT, sender_layer TEXT, receiver TEXT, "
                "receiver_layer TEXT, measure TEXT, value REAL, "
                "PRIMARY KEY (sender, sender_layer, receiver, receiver_layer, measure))"
            )
            if not tables:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (json.dumps(SCHEMA_VERSION),))

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        rows: Iterable[dict[str, Any]],
        *,
        measures: Iterable[dict[str, Any]] = (),
        clear_failure: tuple[str, str, str] | None = None,
    ) -> None:
        """Write finished cells in one transaction (all or none); a cell already present is replaced.

        Args:
            rows: one dict per cell, keyed by `CELL_COLUMNS`.
            measures: similarity-measure values, dicts keyed by `MEASURE_COLUMNS`.
            clear_failure: ``(sender, receiver, objective)`` of a recorded
                failure to forget in the same transaction.
        """
        placeholders = ", ".join("?" for _ in CELL_COLUMNS)
        values = [tuple(_encode(row.get(c)) for c in CELL_COLUMNS) for row in rows]
        measured = [tuple(row[c] for c in MEASURE_COLUMNS) for row in measures]
        with self.transaction() as db:
            db.executemany(f"INSERT OR REPLACE INTO cells ({', '.join(CELL_COLUMNS)}) VALUES ({placeholders})", values)
            db.executemany("INSERT OR REPLACE INTO measures VALUES (?, ?, ?, ?, ?, ?)", measured)
            if clear_failure is not None:
                db.execute("DELETE FROM failures WHERE sender = ? AND receiver = ? AND objective = ?", clear_failure)

    def add_failure(self, sender: str, receiver: str, objective: str, error: str, attempts: int) -> None:
        """Record that a pair failed (it is skipped on reruns unless failures are retried)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, datetime('now'))",
                (sender, receiver, objective, error, attempts),
            )

    def failures(self, objective: str | None = None) -> list[dict[str, Any]]:
        """Failed pairs: ``{"sender", "receiver", "objective", "error", "attempts", "created"}``."""
        sql = "SELECT sender, receiver, objective, error, attempts, created FROM failures"
        args: tuple = ()
        if objective is not None:
            sql, args = sql + " WHERE objective = ?", (objective,)
        names = ("sender", "receiver", "objective", "error", "attempts", "created")
        return [dict(zip(names, r)) for r in self._db.execute(sql + " ORDER BY sender, receiver", args)]

    def done(self) -> set[tuple[str, str, str, str, str]]:
        """Keys ``(sender, sender_layer, receiver, receiver_layer, objective)`` of finished cells."""
        return set(self._db.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM cells").fetchall())

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Finished cells as dicts, optionally filtered by column equality, in a stable order.

        Raises:
            StitchError: a keyword is not one of `CELL_COLUMNS`.
        """
        order = "sender, receiver, objective, sender_index, receiver_index"
        return self._select("cells", CELL_COLUMNS, order, where)

    def measures(self, **where: Any) -> list[dict[str, Any]]:
        """Stored similarity-measure values as dicts (`MEASURE_COLUMNS`), filtered by column equality.

        Raises:
            StitchError: a keyword is not one of `MEASURE_COLUMNS`.
        """
        order = "sender, receiver, measure, sender_layer, receiver_layer"
        return self._select("measures", MEASURE_COLUMNS, order, where)

    def _select(self, table: str, columns: Sequence[str], order: str, where: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of ``table`` whose ``where`` columns equal the given values; column names are checked, values bound."""
        unknown = sorted(set(where) - set(columns))
        if unknown:
            raise StitchError(f"{table}: unknown column(s) {unknown}; the columns are {list(columns)}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        sql = f"SELECT {', '.join(columns)} FROM {table}" + (f" WHERE {clause}" if clause else "")
        return [dict(zip(columns, r)) for r in self._db.execute(f"{sql} ORDER BY {order}", tuple(where.values()))]

    def add_distances(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write per-cell distance statistics (`DISTANCE_COLUMNS`) in one transaction."""
        placeholders = ", ".join("?" for _ in DISTANCE_COLUMNS)
        values = [tuple(row[c] for c in DISTANCE_COLUMNS) for row in rows]
        with self.transaction() as db:
            db.executemany(
                f"INSERT OR REPLACE INTO distances ({', '.join(DISTANCE_COLUMNS)}) VALUES ({placeholders})", values
            )

    def distance_pairs(self) -> set[tuple[str, str]]:
        """``(sender, receiver)`` pairs whose distances are stored."""
        return set(self._db.execute("SELECT DISTINCT sender, receiver FROM distances").fetchall())

    def distance_rows(self) -> list[dict[str, Any]]:
        """Every stored per-cell distance record, in a stable order."""
        sql = f"SELECT {', '.join(DISTANCE_COLUMNS)} FROM distances"
        sql += " ORDER BY sender, receiver, sender_index, receiver_index"
        return [dict(zip(DISTANCE_COLUMNS, r)) for r in self._db.execute(sql)]

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-encodable value under ``key``."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def update_meta(self, key: str, update: Any) -> Any:
        """Read-modify-write the value under ``key`` in one ``BEGIN IMMEDIATE`` transaction.

        Args:
            key: the meta key.
            update: ``old value or None -> new value``.

        Returns:
            The new value.
        """
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            value = update(None if row is None else json.loads(row[0]))
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        return value

    def meta(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def table(self, columns: Sequence[str] = CELL_COLUMNS) -> tuple[list[str], list[dict[str, Any]]]:
        """Every finished cell as one tidy row, with a column per stored similarity measure.

        The one definition of the cell table: `to_csv` writes it and `StudyResults.to_pandas` returns it.

        Args:
            columns: the cell columns, in order (default `CELL_COLUMNS`); the
                measures follow, sorted by name (empty where a cell has none).

        Returns:
            ``(column names, rows)``, each row a dict keyed by those names, in the order of `rows`.
        """
        measured = self.measures()
        names = sorted({row["measure"] for row in measured})
        values = {(r["sender"], r["sender_layer"], r["receiver"], r["receiver_layer"], r["measure"]): r["value"]
                  for r in measured}  # fmt: skip
        header = [*columns, *names]
        table = []
        for row in self.rows():
            cell = (row["sender"], row["sender_layer"], row["receiver"], row["receiver_layer"])
            row.update({name: values.get((*cell, name)) for name in names})
            table.append({c: row.get(c) for c in header})
        return header, table

    def to_csv(self, path: str | Path, columns: Sequence[str] = CELL_COLUMNS) -> Path:
        """Write every finished cell as a tidy CSV (one row per cell), with a column per similarity measure.

        The columns are those of `table`.
        """
        header, rows = self.table(columns)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        return Path(path)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back on an exception.

        IMMEDIATE takes the write lock at the start, so a read-modify-write
        inside the block cannot interleave with another process's.

        Raises:
            StitchError: the store cannot be written (a full disk, a read-only
                folder); the transaction is rolled back, so the store holds
                what it held before.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            failure = _write_failure(err)
            if failure is None:
                raise
            raise write_error(self.path, failure) from err

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


def read_run_meta(out: str | Path, key: str) -> Any:
    """The ``key`` record of the study store in run folder ``out``, or ``None`` if it has none.

    Raises:
        StitchError: ``out`` holds no ``study.sqlite``.
    """
    path = Path(out) / "study.sqlite"
    if not path.is_file():
        raise StitchError(f"{out} holds no study results ({path} is missing); run `modelstitch study run` first")
    with ResultStore(path) as store:
        return store.meta(key)


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


# SQLite's primary result codes of a write the file system refused (``sqlite3.OperationalError.sqlite_errorcode``)
_SQLITE_WRITE_FAILURES = {
    8: errno.EROFS,  # SQLITE_READONLY: "attempt to write a readonly database"
    10: errno.EIO,  # SQLITE_IOERR: "disk I/O error"
    13: errno.ENOSPC,  # SQLITE_FULL: "database or disk is full"
}
_SQLITE_CANTOPEN = 14


def _write_failure(err: sqlite3.OperationalError, *, opening: bool = False) -> OSError | None:
    """The `OSError` a failed SQLite write stands for, or None when ``err`` is something else (a lock timeout).

    Args:
        err: what SQLite raised.
        opening: ``err`` came while opening the store, where SQLITE_CANTOPEN
            ("unable to open database file") means its folder refused the
            ``-wal``/``-shm`` files.
    """
    failures = {**_SQLITE_WRITE_FAILURES, **({_SQLITE_CANTOPEN: errno.EACCES} if opening else {})}
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    if code is None:
        words = {"readonly": errno.EROFS, "disk I/O error": errno.EIO, "disk is full": errno.ENOSPC}
        if opening:
            words["unable to open"] = errno.EACCES
        number = next((n for text, n in words.items() if text in str(err)), None)
    else:
        number = failures.get(code & 0xFF)
    if number is None:
        return None
    # a full disk is the OS's ENOSPC; "readonly" and "disk I/O error" have several causes, so SQLite's words stay
    return OSError(number, os.strerror(number) if number == errno.ENOSPC else str(err))
