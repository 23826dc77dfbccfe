"""Run database: schema, buffered Arrow appends, atomic batch commits, views."""

from pathlib import Path

import duckdb
import pytest

from lme_sim.storage import SCHEMA_VERSION, RunLogger, SchemaError, create_schema, read_only_query


def _db(tmp_path):
    return tmp_path / "sub" / "runs.duckdb"


def _logger(tmp_path, **kw):
    lg = RunLogger(_db(tmp_path), **kw)
    lg.start_run(
        "r", {"name": "test", "model": "world:small", "editor": {"method": "memit"}}, scenario_path="s.yaml"
    )
    return lg


def test_schema_idempotent(tmp_path):
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    create_schema(con)
    create_schema(con)
    assert con.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]
    names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {
        "runs",
        "batches",
        "edits",
        "probes",
        "metrics",
        "weight_stats",
        "forgetting_curve",
        "edit_history",
        "method_summary",
        "layer_usage",
        "weight_health",
    } <= names
    con.close()


def test_version_mismatch(tmp_path):
    RunLogger(_db(tmp_path)).close()
    con = duckdb.connect(str(_db(tmp_path)))
    con.execute("UPDATE schema_info SET version = 99")
    con.close()
    for open_it in (lambda: RunLogger(_db(tmp_path)), lambda: read_only_query(_db(tmp_path), "SELECT 1")):
        with pytest.raises(SchemaError) as err:
            open_it()
        msg = str(err.value)
        assert str(_db(tmp_path)) in msg and "99" in msg and str(SCHEMA_VERSION) in msg


def test_append_flush_and_missing_columns(tmp_path):
    lg = _logger(tmp_path, flush_rows=10)
    for i in range(5):
        lg.append(
            "metrics", [{"run_id": "r", "eval_id": i, "name": "m", "value": float(j)} for j in range(5)]
        )
    assert lg.query("SELECT count(*) FROM metrics") == [(20,)]  # auto-flushed at 10 and 20
    lg.flush()
    assert lg.query("SELECT count(*), count(batch_id), sum(value) FROM metrics") == [(25, 0, 50.0)]
    lg.close()


def test_a_run_s_rows_carry_its_run_id(tmp_path):
    """The logger is bound to its run: rows without a run_id get it; unbound, they are refused."""
    unbound = RunLogger(tmp_path / "u.duckdb")
    with pytest.raises(ValueError, match="rejected_batches.*run_id"):
        unbound.append("rejected_batches", [{"after_batch": 0, "reason": "x"}])
    unbound.append("bench_results", [{"bench_id": "b"}])  # not a run's table
    unbound.close()
    lg = _logger(tmp_path)
    lg.append("rejected_batches", [{"after_batch": 0, "reason": "x"}])
    lg.append("probes", [{"run_id": "other", "probe": "rewrite"}])  # a row's own run_id is kept
    lg.commit_batch("r", {"batch_id": 0}, {"edits": [{"edit_id": 0}]})
    for table, run_id in (("rejected_batches", "r"), ("probes", "other"), ("batches", "r"), ("edits", "r")):
        assert lg.query(f"SELECT list(run_id) FROM {table}") == [([run_id],)], table
    lg.close()


def test_unknown_table_or_column(tmp_path):
    lg = _logger(tmp_path)
    with pytest.raises(ValueError, match="nosuch"):
        lg.append("nosuch", [{"run_id": "r"}])
    with pytest.raises(ValueError, match="probes.*bogus"):
        lg.append("probes", [{"run_id": "r", "bogus": 1}])
    with pytest.raises(ValueError, match="bogus"):
        lg.commit_batch("r", {"batch_id": 0}, {"edits": [{"edit_id": 0, "bogus": 1}]})
    lg.close()


def test_commit_batch_atomic(tmp_path):
    lg = _logger(tmp_path)
    lg.commit_batch(
        "r",
        {"batch_id": 0, "n_edits": 2, "timings": {"edit": 0.5}},
        {
            "edits": [{"edit_id": 0, "batch_id": 0}, {"edit_id": 1, "batch_id": 0}],
            "weight_stats": [{"batch_id": 0, "module": "h.1", "delta_norm": 1.0}],
        },
    )
    lg.append("metrics", [{"run_id": "r", "name": "pending", "value": 1.0}])
    # edit_id 1 is already committed: the primary key fails in the middle of the transaction
    with pytest.raises(duckdb.ConstraintException):
        lg.commit_batch(
            "r",
            {"batch_id": 1},
            {
                "edits": [{"edit_id": 2, "batch_id": 1}, {"edit_id": 1, "batch_id": 1}],
                "weight_stats": [{"batch_id": 1, "module": "h.1"}],
            },
        )
    assert lg.last_committed_batch("r") == 0
    assert lg.committed_edit_ids("r") == {0, 1}
    assert lg.query("SELECT count(*) FROM weight_stats") == [(1,)]
    assert lg.query("SELECT count(*) FROM metrics") == [(0,)]
    lg.flush()  # rows buffered before the failed commit were kept
    assert lg.query("SELECT name FROM metrics") == [("pending",)]
    lg.close()


def test_reopen_after_close(tmp_path):
    lg = _logger(tmp_path)
    lg.commit_batch(
        "r", {"batch_id": 0}, {"edits": [{"edit_id": 7, "modules": ["a", "b"], "delta_norms": [1.0, 2.5]}]}
    )
    lg.append("probes", [{"run_id": "r", "edit_id": 7, "probe": "rewrite", "correct": True}])
    lg.finish_run("r")
    lg.close()
    lg2 = RunLogger(_db(tmp_path))
    assert lg2.last_committed_batch("r") == 0 and lg2.last_committed_batch("x") is None
    assert lg2.committed_edit_ids("r") == {7}
    assert lg2.query("SELECT modules, delta_norms FROM edits") == [(["a", "b"], [1.0, 2.5])]
    assert lg2.query("SELECT status FROM runs") == [("finished",)]
    lg2.close()
    names, rows = read_only_query(_db(tmp_path), "SELECT probe, correct FROM probes")
    assert names == ["probe", "correct"] and rows == [("rewrite", True)]


def test_resume(tmp_path):
    lg = _logger(tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        lg.start_run("r", {"name": "test", "model": "m", "editor": {"method": "memit"}})
    lg.finish_run("r", status="failed")
    assert lg.query("SELECT status, finished_at IS NULL FROM runs") == [("failed", False)]
    lg.start_run("r", {"name": "test", "model": "m", "editor": {"method": "memit"}}, resume=True)
    assert lg.query("SELECT status, finished_at IS NULL FROM runs") == [("running", True)]
    lg.close()


def test_views(tmp_path):
    lg = _logger(tmp_path)
    lg.start_run("other", {"name": "o", "model": "m", "editor": {"method": "memit"}})
    e = lambda i, b, fact, sup=None, mods=("m0", "m1"): {
        "edit_id": i,
        "batch_id": b,
        "fact_key": fact,
        "supersedes": sup,
        "modules": list(mods),
    }
    w = lambda b, mod, cond: {"batch_id": b, "module": mod, "condition": cond, "frobenius": 1.0}
    lg.commit_batch(
        "r",
        {"batch_id": 0},
        {
            "edits": [e(1, 0, "A|r"), e(2, 0, "B|r", mods=["m1"])],
            "weight_stats": [w(0, "m0", 2.0), w(0, "m1", 5.0)],
        },
    )
    lg.commit_batch(
        "r",
        {"batch_id": 1},
        {"edits": [e(3, 1, "A|r", sup=1)], "weight_stats": [w(1, "m0", 3.0), w(1, "m1", 5.0)]},
    )
    # another run reusing edit_id 1: must not leak into run r's joins
    lg.commit_batch("other", {"batch_id": 0}, {"edits": [e(1, 0, "A|r")]})
    p = lambda batch, edit, ok, kind="retention": {
        "run_id": "r",
        "batch_id": batch,
        "edit_id": edit,
        "probe": kind,
        "correct": ok,
    }
    lg.append(
        "probes",
        [
            p(1, 1, True),
            p(1, 2, False),
            p(1, 3, True),  # eval after batch 1
            p(3, 1, False),
            p(3, 2, True),
            p(3, 3, True),  # eval after batch 3
            p(3, 3, False, "rewrite"),
            p(3, None, False, "known"),  # not retention: ignored
        ],
    )
    m = lambda ev, b, name, v: {"run_id": "r", "eval_id": ev, "batch_id": b, "name": name, "value": v}
    lg.append(
        "metrics",
        [
            m(1, 1, "efficacy", 0.5),
            m(1, 1, "retention", 1.0),
            m(2, 3, "efficacy", 0.75),
            m(2, 3, "retention", 0.9),
            m(2, 3, "specificity", 0.6),
        ],
    )
    lg.flush()
    assert lg.query("SELECT batch_id, age, retention, n_probes FROM forgetting_curve WHERE run_id = 'r'") == [
        (1, 0, 1.0, 1),
        (1, 1, 0.5, 2),
        (3, 2, 1.0, 1),
        (3, 3, 0.5, 2),
    ]
    assert lg.query(
        "SELECT fact_key, batch_id, edit_id, superseded_by, superseded_at_batch, stopped_holding_at_batch "
        "FROM edit_history WHERE run_id = 'r'"
    ) == [("A|r", 0, 1, 3, 1, 3), ("A|r", 1, 3, None, None, None), ("B|r", 0, 2, None, None, 1)]
    assert lg.query(
        "SELECT run_id, method, n_edits, final_batch, efficacy, generalization, specificity, fluency, "
        "consistency, retention FROM method_summary ORDER BY run_id"
    ) == [
        ("other", "memit", 1, None, None, None, None, None, None, None),
        ("r", "memit", 3, 3, 0.75, None, 0.6, None, None, 0.9),
    ]
    assert lg.query("SELECT batch_id, module, n_edits FROM layer_usage WHERE run_id = 'r'") == [
        (0, "m0", 1),
        (0, "m1", 2),
        (1, "m0", 1),
        (1, "m1", 1),
    ]
    assert lg.query(
        "SELECT batch_id, module, condition, condition_growth FROM weight_health WHERE run_id = 'r'"
    ) == [(0, "m0", 2.0, 1.0), (1, "m0", 3.0, 1.5), (0, "m1", 5.0, 1.0), (1, "m1", 5.0, 1.0)]
    lg.close()


class _Spy:
    """Wraps a DuckDB connection and counts INSERT statements."""

    def __init__(self, con):
        self._con, self.inserts = con, 0

    def execute(self, sql, *args):
        self.inserts += "INSERT" in sql.upper()
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


@pytest.mark.parametrize("n", [3, 2000])
def test_inserts_independent_of_row_count(tmp_path, n):
    lg = _logger(tmp_path)
    lg.con = spy = _Spy(lg.con)
    lg.append("probes", [{"run_id": "r", "eval_id": 0, "logprob": -1.0 * i} for i in range(n)])
    lg.append("metrics", [{"run_id": "r", "name": f"m{i}", "value": 1.0} for i in range(n)])
    lg.flush()
    assert spy.inserts == 2
    lg.commit_batch("r", {"batch_id": 0}, {"edits": [{"edit_id": i} for i in range(n)]})
    assert spy.inserts == 4  # batches + edits
    assert lg.query("SELECT count(*) FROM probes") == [(n,)]
    assert lg.query("SELECT count(*) FROM edits") == [(n,)]
    lg.con = spy._con
    lg.close()


def test_every_record_has_exactly_its_tables_columns(tmp_path):
    """Rows are built from the typed records of storage/records.py; each names its table's columns."""
    import dataclasses

    from lme_sim.storage.records import RECORDS

    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    create_schema(con)
    for record in RECORDS:
        cols = [
            r[0]
            for r in con.execute(
                "select column_name from information_schema.columns where table_name = ? "
                "order by ordinal_position",
                [record.TABLE],
            ).fetchall()
        ]
        assert [f.name for f in dataclasses.fields(record)] == [c for c in cols if c != "run_id"], (
            record.TABLE
        )


OLD_DATABASE = Path(__file__).parent / "data" / "schema-v3.sql"


def _old_database(path: Path, drop_metrics_n: bool = False) -> Path:
    """A database of schema version 3 (before one counter; tests/data/schema-v3.sql: run r-old,
    batches 0-2, a checkpoint after batch 1, evaluations after batches 1 and 2)."""
    con = duckdb.connect(str(path))
    con.execute(OLD_DATABASE.read_text())
    if drop_metrics_n:  # version 2: metrics had no n yet
        con.execute("DROP VIEW method_summary; DROP VIEW collapse; DROP VIEW efficacy_curve")
        con.execute("ALTER TABLE metrics DROP COLUMN n; UPDATE schema_info SET version = 2")
    con.close()
    return path


@pytest.mark.parametrize("old_version", [3, 2])
def test_an_older_database_is_migrated_on_open_and_its_views_answer(tmp_path, old_version):
    """A database written before one counter opens for reading: migrated once, in place, to this
    schema; its old ``step`` is ``batch_id`` and the copies ``step`` / ``model_version`` are gone."""
    from lme_sim.analysis import collapse_points, comparison_table, summary_rows

    db = _old_database(tmp_path / "old.duckdb", drop_metrics_n=old_version == 2)
    assert read_only_query(db, "SELECT max(version) FROM schema_info")[1] == [(SCHEMA_VERSION,)]
    for table in ("batches", "edits", "probes", "metrics", "weight_stats"):
        cols = read_only_query(db, f"SELECT * FROM {table} LIMIT 0")[0]
        assert "batch_id" in cols and "step" not in cols and "model_version" not in cols, table
    assert read_only_query(db, "SELECT DISTINCT eval_id, batch_id FROM probes ORDER BY 1")[1] == [
        (1, 1),
        (2, 2),
    ]
    assert read_only_query(db, "SELECT batch_id, n_edits, efficacy FROM efficacy_curve")[1] == [
        (1, 4, 0.9),
        (2, 6, 0.4),
    ]
    assert read_only_query(db, "SELECT collapse_batch, collapse_edits FROM collapse")[1] == [(2, 6)]
    assert read_only_query(db, "SELECT batch_id, age, retention FROM forgetting_curve WHERE batch_id = 2")[
        1
    ] == [
        (2, 0, 1.0),
        (2, 1, 1.0),
        (2, 2, 0.0),
    ]
    summary = summary_rows(db, ["r-old"])[0]
    assert (summary["n_edits"], summary["final_batch"], summary["efficacy"]) == (6, 2, 0.4)
    assert collapse_points(db, ["r-old"], 0.95)[0]["collapse_batch"] == 1
    assert comparison_table(db, ["r-old"]).row_count > 0
    rows = {
        t: read_only_query(db, f"SELECT count(*) FROM {t}")[1][0][0] for t in ("batches", "probes", "metrics")
    }
    assert rows == {"batches": 3, "probes": 10, "metrics": 4}  # every row kept
    RunLogger(db).close()  # and a writer opens it as it is


def test_an_older_database_that_cannot_be_written_is_one_error_saying_how(tmp_path):
    db = _old_database(tmp_path / "old.duckdb")
    db.chmod(0o444)
    try:
        with pytest.raises(
            SchemaError, match=r"old.duckdb: database schema version 3.*make the file writable"
        ):
            read_only_query(db, "SELECT 1")
    finally:
        db.chmod(0o644)


def test_rollback_after_removes_exactly_the_rows_after_the_checkpoint(tmp_path):
    """One counter: after rolling back to batch 1 (its checkpoint), batches, edits and weight stats
    up to batch 1 stay; evaluations of batch 1's model on are redone (gone), the batch rejected after
    batch 1 is replayed (gone)."""
    db = _old_database(tmp_path / "old.duckdb")
    with RunLogger(db) as lg:
        assert lg.checkpoints("r-old")[0] == (1, "ckpt/batch-000001.pt")
        lg.rollback_after("r-old", 1)
        q = lambda sql: lg.query(sql)
        assert q("SELECT list(batch_id ORDER BY batch_id) FROM batches") == [([0, 1],)]
        assert q("SELECT list(edit_id ORDER BY edit_id) FROM edits") == [([0, 1, 2, 3],)]
        assert q("SELECT list(batch_id ORDER BY batch_id) FROM weight_stats") == [([0, 1],)]
        for table in ("probes", "metrics", "rejected_batches"):
            assert q(f"SELECT count(*) FROM {table}") == [(0,)], table
        lg.rollback_after("r-old", -1)  # no checkpoint: everything goes
        assert q("SELECT count(*) FROM batches") == q("SELECT count(*) FROM edits") == [(0,)]
