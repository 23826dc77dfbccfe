"""Reading finished runs back: the papers' comparison table and exports of a run's rows.

Everything here opens the run database read-only (a finished run; DuckDB allows one writer).
"""

from __future__ import annotations

from pathlib import Path

from .storage.logger import read_only_query

SUMMARY_COLUMNS = ("efficacy", "generalization", "specificity", "fluency", "consistency", "retention",
                   "general_ability", "general_ability_retention")
EXPORT_TABLES = ("runs", "batches", "edits", "probes", "metrics", "weight_stats", "rejected_batches")


class AnalysisError(ValueError):
    pass


def sql_list(run_ids: list[str]) -> str:
    return ", ".join("'" + r.replace("'", "''") + "'" for r in run_ids)


def check_runs(db, run_ids: list[str]) -> None:
    """Every id names a run in ``db`` (else one error listing the missing ones and the known ones)."""
    if not Path(db).exists():
        raise AnalysisError(f"{db}: no such database")
    known = [r[0] for r in read_only_query(db, "select run_id from runs order by created_at")[1]]
    missing = [r for r in run_ids if r not in known]
    if missing:
        raise AnalysisError(f"{db}: no run {', '.join(missing)} (runs here: {', '.join(known) or 'none'})")


def summary_rows(db, run_ids: list[str]) -> list[dict]:
    """One ``method_summary`` row per run, in the order asked."""
    check_runs(db, run_ids)
    cols, rows = read_only_query(db, f"select * from method_summary where run_id in ({sql_list(run_ids)})")
    by_id = {r[0]: dict(zip(cols, r)) for r in rows}
    return [by_id[r] for r in run_ids]


def comparison_table(db, run_ids: list[str]):
    """A rich Table: one column per run, the papers' metrics as rows (n/a where not measured)."""
    from rich.table import Table

    rows = summary_rows(db, run_ids)
    table = Table(title="lifelong editing: final evaluation", caption=f"{db}")
    table.add_column("")
    for r in rows:
        table.add_column(f"{r['method']}\n{r['run_id']}", justify="right")
    table.add_row("model", *[str(r["model"]) for r in rows])
    table.add_row("edits", *[str(r["n_edits"]) for r in rows])
    for col in SUMMARY_COLUMNS:
        table.add_row(col, *[_fmt(r[col], col) for r in rows])
    return table


def _fmt(v, col: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if col == "fluency" else f"{v:.3f}"


def export_run(db, run_id: str, out_dir, fmt: str = "parquet") -> list[Path]:
    """Every table's rows of ``run_id`` as ``<out_dir>/<table>.<fmt>`` (parquet or csv)."""
    import duckdb

    if fmt not in ("parquet", "csv"):
        raise AnalysisError(f"--format must be parquet or csv, not {fmt!r}")
    check_runs(db, [run_id])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db), read_only=True)
    paths = []
    try:
        for table in EXPORT_TABLES:
            path = out / f"{table}.{fmt}"
            option = "(FORMAT parquet)" if fmt == "parquet" else "(HEADER, DELIMITER ',')"
            con.execute(f"COPY (SELECT * FROM {table} WHERE run_id = ?) TO '{path}' {option}", [run_id])
            paths.append(path)
    finally:
        con.close()
    return paths
