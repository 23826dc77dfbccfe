"""The single writer of a run database.

DuckDB allows one writer process, so one ``RunLogger`` owns the connection (in the distributed
runtime it is wrapped as a Ray actor) and every other component sends it row batches.  Rows are
buffered per table and written with one Arrow insert per table (never row by row);
``commit_batch`` writes a batch and its rows in one transaction, so a batch is either fully in the
database or not at all, which is what resuming relies on. ``start_run`` binds the logger to its run:
every row of a run's table it writes carries that ``run_id`` (a row without one is refused).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from .schema import (
    RUN_TABLES,
    SCHEMA_VERSION,
    TABLES,
    SchemaError,
    check_version,
    create_schema,
    migrate,
    stored_version,
)

log = logging.getLogger(__name__)

WRITABLE = tuple(t for t in TABLES if t != "schema_info")
# the status of a run left 'running' in a database no logger has open: its logger died
INTERRUPTED = "interrupted"

_ARROW_TYPES = {
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "TIMESTAMP": pa.timestamp("us"),
    "VARCHAR[]": pa.list_(pa.string()),
    "INTEGER[]": pa.list_(pa.int32()),
    "DOUBLE[]": pa.list_(pa.float64()),
}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _convert(value, dtype: str):
    """A Python value ready for the Arrow column of DuckDB type ``dtype``."""
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        value = value.tolist()
    if dtype == "JSON":
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if dtype == "TIMESTAMP":
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        elif isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


class RunLogger:
    """Owns the DuckDB connection of one database file; buffers and writes run rows."""

    def __init__(self, db_path, flush_rows: int = 5000):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.con = duckdb.connect(str(self.path))
        try:
            create_schema(self.con, self.path)
        except Exception:
            self.con.close()
            raise
        self.columns = {
            t: dict(
                self.con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = ? ORDER BY ordinal_position",
                    [t],
                ).fetchall()
            )
            for t in WRITABLE
        }
        self._buffers: dict[str, list[dict]] = {t: [] for t in WRITABLE}
        self.run_id: str | None = None  # the run of this logger (``start_run``)
        # DuckDB lets one process write a file: a run it still lists as running has no logger, it
        # was interrupted (its logger died before it could mark the run failed)
        self.con.execute("UPDATE runs SET status = ? WHERE status = 'running'", [INTERRUPTED])

    # ---- runs ---------------------------------------------------------------------------------
    def start_run(
        self, run_id: str, scenario: dict, *, scenario_path: str | None = None, resume: bool = False
    ) -> str | None:
        """Register a run of ``scenario`` (the run's scenario as JSON: its ``name``, ``model`` and
        ``editor.method`` fill the row's columns) as running and bind the logger to it (rows without
        a ``run_id`` get this one); an existing run_id is an error unless ``resume=True``. Returns the
        status the run had (failed, interrupted; None: a new run)."""
        from lme_sim import __version__

        before = self.con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if before and not resume:
            raise ValueError(f"{self.path}: run {run_id!r} already exists (pass resume=True)")
        self.run_id = run_id
        if before:
            self.con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id]
            )
            return before[0]
        self.con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', ?, NULL, ?, ?)",
            [
                run_id,
                scenario["name"],
                None if scenario_path is None else str(scenario_path),
                json.dumps(scenario, default=str),
                scenario["model"],
                scenario["editor"]["method"],
                _now(),
                SCHEMA_VERSION,
                __version__,
            ],
        )
        return None

    def finish_run(self, run_id, status: str = "finished") -> None:
        """Flush pending rows and mark the run finished (or failed)."""
        self.flush()
        self.con.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, _now(), run_id]
        )

    # ---- writing ------------------------------------------------------------------------------
    def _check(self, table: str, rows: list[dict]) -> None:
        if table not in self.columns:
            raise ValueError(f"unknown table {table!r} (known: {', '.join(WRITABLE)})")
        cols = self.columns[table]
        for row in rows:
            for key in row:
                if key not in cols:
                    raise ValueError(f"table {table!r} has no column {key!r}")

    def _stamped(self, table: str, rows: list[dict], run_id=None) -> list[dict]:
        """The rows of a run's table with their ``run_id``: the row's own, else ``run_id``, else the
        logger's run; a row left without one is an error (it would be lost to every per-run query)."""
        if table not in RUN_TABLES:
            return rows
        run_id = run_id or self.run_id
        stamped = [{**r, "run_id": r.get("run_id") or run_id} for r in rows]
        if any(r["run_id"] is None for r in stamped):
            raise ValueError(f"rows of table {table!r} need a run_id (start_run binds the logger to its run)")
        return stamped

    def append(self, table: str, rows: list[dict], run_id=None) -> None:
        """Buffer rows for ``table`` (a run's rows get ``run_id`` where they have none, else the
        logger's; a logger shared by the runs of a study is always given it); missing columns become
        NULL. Flushes at ``flush_rows``."""
        self._check(table, rows)
        rows = self._stamped(table, rows, run_id)
        self._buffers[table].extend(rows)
        if len(self._buffers[table]) >= self.flush_rows:
            self._write({table: self._buffers[table]})
            self._buffers[table] = []

    def _arrow(self, table: str, rows: list[dict]) -> pa.Table:
        """Rows as an Arrow table with the column types of ``table``."""
        return pa.table(
            {
                col: pa.array([_convert(r.get(col), dtype) for r in rows], type=_ARROW_TYPES[dtype])
                for col, dtype in self.columns[table].items()
            }
        )

    def _write(self, tables: dict[str, list[dict]]) -> None:
        """Insert each table's rows with one Arrow insert, all in one transaction."""
        arrow = {t: self._arrow(t, rows) for t, rows in tables.items() if rows}
        if not arrow:
            return
        for table, tbl in arrow.items():
            self.con.register(f"_lme_rows_{table}", tbl)
        try:
            self.con.execute("BEGIN TRANSACTION")
            try:
                for table in arrow:
                    self.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _lme_rows_{table}")
                self.con.execute("COMMIT")
            except Exception:
                self.con.execute("ROLLBACK")
                raise
        finally:  # views can only be dropped outside an aborted transaction
            for table in arrow:
                self.con.unregister(f"_lme_rows_{table}")

    def flush(self) -> None:
        """Write all buffered rows (one insert per table, one transaction)."""
        self._write(self._buffers)
        self._buffers = {t: [] for t in WRITABLE}

    def commit_batch(self, run_id, batch_row: dict, rows: dict[str, list[dict]]) -> None:
        """Write a batch row, its rows (edits, weight_stats, ...) and all buffered rows atomically.

        ``run_id`` is filled in where a row lacks it, ``committed_at`` defaults to now.  On error
        nothing of the batch is written and the previously buffered rows stay buffered.
        """
        self._check("batches", [batch_row])
        pending = {t: list(r) for t, r in self._buffers.items()}
        pending["batches"].extend(self._stamped("batches", [{"committed_at": _now(), **batch_row}], run_id))
        for table, table_rows in rows.items():
            self._check(table, table_rows)
            pending[table].extend(self._stamped(table, table_rows, run_id))
        self._write(pending)
        self._buffers = {t: [] for t in WRITABLE}

    def rollback_after(self, run_id, batch_id: int) -> None:
        """Delete, in one transaction, what the run wrote after batch ``batch_id`` (the checkpoint a
        resume starts from; -1: all of it). Resuming replays from the checkpoint the stream's events
        after that batch: the later batches with their edits and weight stats, the batches rejected
        after it, and the evaluations from the model of ``batch_id`` on (the checkpoint is written
        before the stream reaches the evaluation that follows its batch, so that one is redone too)."""
        self.flush()
        deletes = [
            ("batches", "batch_id > ?"),
            ("edits", "batch_id > ?"),
            ("weight_stats", "batch_id > ?"),
            ("rejected_batches", "after_batch >= ?"),  # rejected after this batch: replayed
            ("probes", "batch_id >= ?"),  # evaluations of this batch's model or later: redone
            ("metrics", "batch_id >= ?"),
        ]
        self.con.execute("BEGIN TRANSACTION")
        try:
            for table, where in deletes:
                self.con.execute(f"DELETE FROM {table} WHERE run_id = ? AND {where}", [run_id, batch_id])
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    # ---- reading ------------------------------------------------------------------------------
    def checkpoints(self, run_id) -> list[tuple[int, str]]:
        """(batch_id, checkpoint file) of the run's checkpointed batches, newest first."""
        return self.con.execute(
            "SELECT batch_id, checkpoint FROM batches WHERE run_id = ? AND checkpoint IS NOT NULL "
            "ORDER BY batch_id DESC",
            [run_id],
        ).fetchall()

    def landed_evaluations(self, run_id) -> set[int]:
        """The eval_ids of the run's evaluations in the database (their probes or metrics)."""
        self.flush()
        rows = self.con.execute(
            "SELECT eval_id FROM metrics WHERE run_id = ? UNION SELECT eval_id FROM probes WHERE run_id = ?",
            [run_id, run_id],
        ).fetchall()
        return {r[0] for r in rows}

    def last_committed_batch(self, run_id) -> int | None:
        """Highest committed batch_id of the run, None if none."""
        return self.con.execute("SELECT max(batch_id) FROM batches WHERE run_id = ?", [run_id]).fetchone()[0]

    def committed_edit_ids(self, run_id) -> set[int]:
        """edit_ids of the run already in the database."""
        rows = self.con.execute("SELECT edit_id FROM edits WHERE run_id = ?", [run_id]).fetchall()
        return {r[0] for r in rows}

    def query(self, sql: str, params=None) -> list[tuple]:
        """Run a query on a separate cursor of the connection (buffered rows are not visible)."""
        cur = self.con.cursor()
        try:
            return cur.execute(sql, params or []).fetchall()
        finally:
            cur.close()

    def close(self) -> None:
        """Flush pending rows and close the connection."""
        if self.con is not None:
            try:
                self.flush()
            finally:
                self.con.close()
                self.con = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DatabaseError(RuntimeError):
    """A results database that cannot be opened as asked; the message is one line naming the file."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only, config={"enable_external_access": False})
    except duckdb.Error as e:
        raise DatabaseError(f"{path}: cannot open it as a DuckDB database ({_one_line(e)})") from None


def _writable(path: Path) -> bool:
    """This user may write the file, and it has a write bit (root may write any file: a file made
    read-only on purpose is still left alone)."""
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def migrate_file(path: Path, version: int) -> None:
    """Migrate the database at ``path`` (of the older schema ``version``) to this one, in one
    transaction (:func:`~.schema.migrate`), and say so in one warning line. A file this user may
    not write is a ``SchemaError`` that says how to read it."""
    if not _writable(path):
        raise SchemaError(
            f"{path}: database schema version {version}, but this lme-sim uses version {SCHEMA_VERSION} "
            "and migrates it on open, which needs write access: make the file writable (or copy it) "
            "and open it again"
        )
    con = _connect(path, read_only=False)
    try:
        migrate(con, path)
    finally:
        con.close()
    log.warning("%s: migrated from schema version %s to %s (docs/database.md)", path, version, SCHEMA_VERSION)


def open_read_only(db_path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to an existing database of this schema version, without access to
    other files (DuckDB's read-only mode still lets ``COPY ... TO`` write any file, the database's
    own included). Raises FileNotFoundError, :class:`DatabaseError` (a directory, a file DuckDB
    cannot open) or ``SchemaError``. Opening read-only changes nothing in the file, except that a
    database of an older schema version is first migrated to this one, once (:func:`migrate_file`)."""
    path = Path(db_path)
    if path.is_dir():
        raise DatabaseError(f"{path}: is a directory, not a database file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database")
    con = _connect(path, read_only=True)
    try:
        version = stored_version(con)
        if version is not None and version < SCHEMA_VERSION:
            con.close()
            migrate_file(path, version)
            con = _connect(path, read_only=True)
        check_version(con, path)
    except Exception:
        con.close()
        raise
    return con


def check_writable(db_path) -> None:
    """Raise :class:`DatabaseError` or ``SchemaError`` if a run could not write to ``db_path``: a
    directory, a file without write permission, a file that is not a DuckDB database or has another
    schema version, or a folder that cannot be created. Creates and changes nothing (a database of
    an older schema version is migrated, as every open does)."""
    path = Path(db_path)
    if path.exists() or path.is_symlink():
        if path.is_file() and not _writable(path):
            raise DatabaseError(f"{path}: the file is read-only; a run writes to its database")
        open_read_only(path).close()
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise DatabaseError(f"{path}: cannot create it ({parent} is not a writable folder)")


def read_only_query(db_path, sql: str, params=None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of ``sql`` with ``params`` (values for its ``?`` placeholders) on a
    database opened read-only (for ``lme-sim query`` and the CLI's checks).

    DuckDB locks the file while a writer has it open, so this works on finished runs (or from
    another process once the logger is closed). Errors: see :func:`open_read_only`; SQL that DuckDB
    refuses raises its own error, SQL without a statement a :class:`DatabaseError`.
    """
    path = Path(db_path)
    con = open_read_only(path)
    try:
        cur = con.execute(sql, params) if params is not None else con.execute(sql)
        if cur is None:
            raise DatabaseError(f"{path}: no SQL statement to run in {sql!r}")
        names = [d[0] for d in cur.description] if cur.description else []
        return names, cur.fetchall()
    finally:
        con.close()
