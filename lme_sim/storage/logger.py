"""The single writer of a run database.

DuckDB allows one writer process, so one ``RunLogger`` owns the connection (in the distributed
runtime it is wrapped as a Ray actor) and every other component sends it row batches.  Rows are
buffered per table and written with one Arrow insert per table (never row by row);
``commit_batch`` writes a batch and its rows in one transaction, so a batch is either fully in the
database or not at all, which is what resuming relies on.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from .schema import SCHEMA_VERSION, TABLES, check_version, create_schema

WRITABLE = tuple(t for t in TABLES if t != "schema_info")

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

    # ---- runs ---------------------------------------------------------------------------------
    def start_run(self, run_id, name, scenario_path, scenario: dict, model, method,
                  resume: bool = False) -> None:
        """Register a run as running; an existing run_id is an error unless ``resume=True``."""
        from lme_sim import __version__

        exists = self.con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if exists and not resume:
            raise ValueError(f"{self.path}: run {run_id!r} already exists (pass resume=True)")
        if exists:
            self.con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id]
            )
            return
        self.con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', ?, NULL, ?, ?)",
            [run_id, name, None if scenario_path is None else str(scenario_path),
             json.dumps(scenario, default=str), model, method, _now(), SCHEMA_VERSION,
             __version__],
        )

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

    def append(self, table: str, rows: list[dict]) -> None:
        """Buffer rows for ``table``; missing columns become NULL. Flushes at ``flush_rows``."""
        self._check(table, rows)
        self._buffers[table].extend(rows)
        if len(self._buffers[table]) >= self.flush_rows:
            self._write({table: self._buffers[table]})
            self._buffers[table] = []

    def _arrow(self, table: str, rows: list[dict]) -> pa.Table:
        """Rows as an Arrow table with the column types of ``table``."""
        return pa.table({
            col: pa.array([_convert(r.get(col), dtype) for r in rows], type=_ARROW_TYPES[dtype])
            for col, dtype in self.columns[table].items()
        })

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
                    self.con.execute(
                        f"INSERT INTO {table} BY NAME SELECT * FROM _lme_rows_{table}"
                    )
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
        batch_row = {"run_id": run_id, "committed_at": _now(), **batch_row}
        pending = {t: list(r) for t, r in self._buffers.items()}
        pending["batches"].append(batch_row)
        for table, table_rows in rows.items():
            self._check(table, table_rows)
            pending[table].extend({"run_id": run_id, **r} for r in table_rows)
        self._check("batches", [batch_row])
        self._write(pending)
        self._buffers = {t: [] for t in WRITABLE}

    # ---- reading ------------------------------------------------------------------------------
    def last_committed_batch(self, run_id) -> int | None:
        """Highest committed batch_id of the run, None if none."""
        return self.con.execute(
            "SELECT max(batch_id) FROM batches WHERE run_id = ?", [run_id]
        ).fetchone()[0]

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


def read_only_query(db_path, sql: str, params=None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of ``sql`` on a database opened read-only (for ``lme-sim query``);
    ``params``: values for its ``?`` placeholders (a list may fill one, e.g. ``run_id = any(?)``).

    DuckDB locks the file while a writer has it open, so this works on finished runs (or from
    another process once the logger is closed).
    """
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database")
    con = duckdb.connect(str(path), read_only=True)
    try:
        check_version(con, path)
        cur = con.execute(sql, params or [])
        names = [d[0] for d in cur.description] if cur.description else []
        return names, cur.fetchall()
    finally:
        con.close()
