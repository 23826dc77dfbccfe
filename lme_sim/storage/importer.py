"""Runs from several results databases gathered into one (``lme-sim import``).

A study's runs can land in several files: runs on different machines, or in different sessions with
their own ``--db``. ``compare`` and ``report`` read one file; :func:`import_runs` copies every row of
the chosen runs (each table of :data:`~.schema.RUN_TABLES`) into it. Sources are opened read-only (an
older schema version is migrated first, as every open does); the target gets all the rows in one
transaction, or none: a run id it already holds is an error, so nothing is ever duplicated.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from .logger import DatabaseError, check_writable, open_read_only
from .schema import RUN_TABLES, create_schema


class RunImportError(DatabaseError):
    """A source or a run that cannot be imported: one line naming the file and the run."""


def _rows_of(source: Path, run_ids: list[str] | None) -> tuple[list[str], dict[str, object]]:
    """(the run ids taken from ``source``, {table: its rows of those runs as an Arrow table})."""
    con = open_read_only(source)
    try:
        known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY created_at").fetchall()]
        wanted = known if run_ids is None else [r for r in known if r in run_ids]
        if run_ids is None and not known:
            raise RunImportError(f"{source}: holds no run")
        rows = {
            table: con.sql(f"SELECT * FROM {table} WHERE run_id = any(?)", params=[wanted]).to_arrow_table()
            for table in RUN_TABLES
        }
    finally:
        con.close()
    return wanted, rows


def import_runs(db, sources: list, run_ids: list[str] | None = None) -> list[str]:
    """Copy the runs of ``sources`` (DuckDB files; ``run_ids``: only these, else all of each) into
    ``db`` (created if missing). Returns the ids copied, in the order of the sources. Raises
    :class:`RunImportError` for a run named twice (in two sources, or already in ``db``) or a chosen
    id found in no source, before anything is written; errors of opening a file as those of
    :func:`~.logger.open_read_only`."""
    target = Path(db)
    taken: dict[str, Path] = {}
    gathered = []
    for source in map(Path, sources):
        if source.resolve() == target.resolve():
            raise RunImportError(f"{source}: is the target database itself")
        ids, rows = _rows_of(source, run_ids)
        for r in ids:
            if r in taken:
                raise RunImportError(f"{source}: run {r} is also in {taken[r]}")
            taken[r] = source
        gathered.append(rows)
    missing = [r for r in run_ids or [] if r not in taken]
    if missing:
        raise RunImportError(f"no run {', '.join(missing)} in {', '.join(map(str, sources))}")
    check_writable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    created = not target.exists()
    con = duckdb.connect(str(target))
    try:
        create_schema(con, target)
        here = {
            r[0]
            for r in con.execute("SELECT run_id FROM runs WHERE run_id = any(?)", [list(taken)]).fetchall()
        }
        if here:
            raise RunImportError(
                f"{target}: already holds run {', '.join(sorted(here))}; nothing was imported"
            )
        con.execute("BEGIN TRANSACTION")
        try:
            for rows in gathered:
                for table, arrow in rows.items():
                    con.register("_lme_rows", arrow)
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _lme_rows")
                    con.unregister("_lme_rows")
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    except Exception:
        con.close()
        if created:  # a database this call made holds nothing of value: leave none behind
            for f in (target, target.with_name(target.name + ".wal")):
                f.unlink(missing_ok=True)
        raise
    finally:
        con.close()
    return list(taken)
