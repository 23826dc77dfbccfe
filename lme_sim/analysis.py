"""Reading finished runs back: the papers' comparison table and exports of a run's rows.

Everything here opens the run database read-only (a finished run; DuckDB allows one writer).
"""

from __future__ import annotations

from pathlib import Path

from .storage.logger import read_only_query

SUMMARY_COLUMNS = (
    "efficacy",
    "gen_efficacy",
    "generalization",
    "gen_generalization",
    "specificity",
    "gen_specificity",
    "fluency",
    "consistency",
    "retention",
    "general_ability",
    "general_ability_retention",
)
# the unit of a summary column that is not a fraction in [0, 1]: ROME's fluency, the weighted n-gram
# entropy of greedy generations in bits, x100 (lme_sim.metrics.fluency)
UNITS = {"fluency": "bits x100"}
EXPORT_TABLES = ("runs", "batches", "edits", "probes", "metrics", "weight_stats", "rejected_batches")


class AnalysisError(ValueError):
    pass


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
    cols, rows = read_only_query(db, "select * from method_summary where run_id = any(?)", [list(run_ids)])
    by_id = {r[0]: dict(zip(cols, r)) for r in rows}
    return [by_id[r] for r in run_ids]


# The ``collapse`` view's query with the threshold as a parameter (the view fixes it at 0.5).
COLLAPSE_SQL = """
    SELECT r.run_id, r.method, ?::DOUBLE AS threshold,
           min(c.batch_id) FILTER (WHERE c.efficacy < ?) AS collapse_batch,
           arg_min(c.n_edits, c.batch_id) FILTER (WHERE c.efficacy < ?) AS collapse_edits
    FROM runs r LEFT JOIN efficacy_curve c ON c.run_id = r.run_id
    WHERE r.run_id = any(?)
    GROUP BY r.run_id, r.method"""


def collapse_points(db, run_ids: list[str], threshold: float = 0.5) -> list[dict]:
    """Per run (in the order asked): the first evaluation (its ``batch_id``) at which efficacy fell
    below ``threshold`` (``collapse_batch``) and the edits committed by then (``collapse_edits``); both None
    if it never did. The ``collapse`` view gives the same at 0.5."""
    check_runs(db, run_ids)
    cols, rows = read_only_query(db, COLLAPSE_SQL, [threshold, threshold, threshold, list(run_ids)])
    by_id = {r[0]: dict(zip(cols, r)) for r in rows}
    return [by_id[r] for r in run_ids]


def run_configs(db, run_ids: list[str]) -> dict[str, dict]:
    """Each run's scenario as it ran (the ``runs.scenario`` JSON), by run id."""
    import json

    _, rows = read_only_query(db, "select run_id, scenario from runs where run_id = any(?)", [list(run_ids)])
    return {rid: json.loads(cfg) if cfg else {} for rid, cfg in rows}


def run_protocol(config: dict) -> str | None:
    """A run's protocol, from its config: its edits per batch, "batch N" (None for a config without
    one)."""
    size = (config.get("stream") or {}).get("batch_size")
    return None if size is None else f"batch {size}"


def run_groups(db, run_ids: list[str]) -> list[dict]:
    """The runs grouped by editor and protocol, in the order first asked: per group its ``method`` (the
    editor's ``name`` where it has one, e.g. alphaedit-nas beside alphaedit), ``protocol`` (None where
    the configs say none), ``runs`` (their method_summary rows, each with its ``seed``: the run's
    data.seed) and ``label``."""
    rows = summary_rows(db, run_ids)  # first: it names a missing database or run (AnalysisError)
    configs = run_configs(db, run_ids)
    groups: dict[tuple, dict] = {}
    for row in rows:
        cfg = configs.get(row["run_id"], {})
        editor = cfg.get("editor") if isinstance(cfg.get("editor"), dict) else {}
        key = (editor.get("name") or row["method"], run_protocol(cfg))
        group = groups.setdefault(key, {"method": key[0], "protocol": key[1], "runs": []})
        group["runs"].append({**row, "seed": (cfg.get("data") or {}).get("seed")})
    for g in groups.values():
        g["label"] = g["method"] + (f" ({g['protocol']})" if g["protocol"] else "")
    return list(groups.values())


def run_labels(db, run_ids: list[str]) -> dict[str, str]:
    """Each run's label, by run id: its group's (:func:`run_groups`), e.g. "alphaedit-nas (batch 100)"."""
    return {r["run_id"]: g["label"] for g in run_groups(db, run_ids) for r in g["runs"]}


def mean_std(values) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of the values that are not None;
    None where there are none."""
    import statistics

    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def comparison_table(db, run_ids: list[str]):
    """A rich Table, the papers' metrics as rows (n/a where not measured), each from its run's last
    evaluation (:func:`summary_rows`): one column per run, or, where several runs share a method and
    protocol (seeds), one column per method with mean ± std and n. What ``compare`` and the end of a
    run print."""
    groups = run_groups(db, run_ids)
    if any(len(g["runs"]) > 1 for g in groups):
        return _spread_table(db, groups)
    from rich.table import Table

    rows = summary_rows(db, run_ids)
    labels = {r["run_id"]: g["label"] for g in groups for r in g["runs"]}  # as run_labels, from groups
    table = Table(title="lifelong editing: final evaluation", caption=f"{db}")
    table.add_column("")
    for r in rows:
        table.add_column(f"{labels[r['run_id']]}\n{r['run_id']}", justify="right")
    table.add_row("model", *[str(r["model"]) for r in rows])
    table.add_row("edits", *[str(r["n_edits"]) for r in rows])
    for col in SUMMARY_COLUMNS:
        table.add_row(f"{col} ({UNITS[col]})" if col in UNITS else col, *[_fmt(r[col], col) for r in rows])
    table.add_row("collapse batch", *[_collapse(r["collapse_batch"]) for r in rows])
    table.add_row("collapse edits", *[_collapse(r["collapse_edits"]) for r in rows])
    table.add_row("gen collapse edits", *[_collapse(r["gen_collapse_edits"]) for r in rows])
    return table


def _spread_table(db, groups: list[dict]):
    """One column per method (and protocol): mean ± std over its runs (sample std; n runs)."""
    from rich.table import Table

    table = Table(
        title="lifelong editing: final evaluation, mean ± std over runs",
        caption=f"{db}; std: sample standard deviation over the n runs (n/a: not measured)",
    )
    table.add_column("")
    for g in groups:
        table.add_column(f"{g['label']}\nn = {len(g['runs'])}", justify="right")
    table.add_row("runs", *["\n".join(r["run_id"] for r in g["runs"]) for g in groups])  # one per line
    table.add_row("seeds", *[", ".join(str(r["seed"]) for r in g["runs"]) for g in groups])
    table.add_row("model", *[", ".join(dict.fromkeys(str(r["model"]) for r in g["runs"])) for g in groups])
    table.add_row("edits", *[_spread([r["n_edits"] for r in g["runs"]], "edits") for g in groups])
    for col in SUMMARY_COLUMNS:
        table.add_row(col, *[_spread([r[col] for r in g["runs"]], col) for g in groups])
    for col, name in (
        ("collapse_batch", "collapse batch"),
        ("collapse_edits", "collapse edits"),
        ("gen_collapse_edits", "gen collapse edits"),
    ):
        table.add_row(name, *[_spread_collapse([r[col] for r in g["runs"]]) for g in groups])
    return table


def _spread(values: list, col: str) -> str:
    """``mean ± std``, with ``(n of N)`` where some runs did not measure it; n/a where none did; the
    value alone for a method of one run."""
    ms = mean_std(values)
    if ms is None:
        return "n/a"
    mean, std, n = ms
    digits = 0 if col == "edits" else 1 if col == "fluency" else 3
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    part = "" if n == len(values) else f" ({n} of {len(values)})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{part}"


def _spread_collapse(values: list) -> str:
    """Over the runs that collapsed: mean ± std, and how many of them did; "none" where none did."""
    ms = mean_std(values)
    if ms is None:
        return "none"
    mean, std, n = ms
    return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {std:.2g} ({n} of {len(values)})"


def _collapse(v) -> str:
    """The batch or edit count where efficacy fell below 0.5, or "none" where it never did."""
    return "none" if v is None else str(int(v))


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
            # the relation API: no value (the run id, the path) is pasted into SQL text
            this_run = duckdb.ColumnExpression("run_id") == duckdb.ConstantExpression(run_id)
            rows = con.table(table).filter(this_run)
            if fmt == "parquet":
                rows.write_parquet(str(path))
            else:
                rows.write_csv(str(path), header=True, sep=",")
            paths.append(path)
    finally:
        con.close()
    return paths
