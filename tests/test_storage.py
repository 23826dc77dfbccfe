"""Run database: schema, buffered Arrow appends, atomic batch commits, views."""

import duckdb
import pytest

from lme_sim.storage import SCHEMA_VERSION, RunLogger, SchemaError, create_schema, read_only_query


def _db(tmp_path):
    return tmp_path / "sub" / "runs.duckdb"


def _logger(tmp_path, **kw):
    lg = RunLogger(_db(tmp_path), **kw)
    lg.start_run("r", "test", "s.yaml", {"name": "test"}, "world:small", "memit")
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
    assert lg.query("SELECT count(*), count(step), sum(value) FROM metrics") == [(25, 0, 50.0)]
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
        {"batch_id": 0, "step": 1, "n_edits": 2, "timings": {"edit": 0.5}},
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
            {"batch_id": 1, "step": 2},
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
        lg.start_run("r", "test", "s.yaml", {}, "m", "memit")
    lg.finish_run("r", status="failed")
    assert lg.query("SELECT status, finished_at IS NULL FROM runs") == [("failed", False)]
    lg.start_run("r", "test", "s.yaml", {}, "m", "memit", resume=True)
    assert lg.query("SELECT status, finished_at IS NULL FROM runs") == [("running", True)]
    lg.close()


def test_views(tmp_path):
    lg = _logger(tmp_path)
    lg.start_run("other", "o", None, {}, "m", "memit")
    e = lambda i, b, step, fact, sup=None, mods=("m0", "m1"): {
        "edit_id": i,
        "batch_id": b,
        "step": step,
        "fact_key": fact,
        "supersedes": sup,
        "modules": list(mods),
    }
    w = lambda b, mod, cond: {"batch_id": b, "module": mod, "condition": cond, "frobenius": 1.0}
    lg.commit_batch(
        "r",
        {"batch_id": 0, "step": 0},
        {
            "edits": [e(1, 0, 0, "A|r"), e(2, 0, 0, "B|r", mods=["m1"])],
            "weight_stats": [w(0, "m0", 2.0), w(0, "m1", 5.0)],
        },
    )
    lg.commit_batch(
        "r",
        {"batch_id": 1, "step": 2},
        {"edits": [e(3, 1, 2, "A|r", sup=1)], "weight_stats": [w(1, "m0", 3.0), w(1, "m1", 5.0)]},
    )
    # another run reusing edit_id 1: must not leak into run r's joins
    lg.commit_batch("other", {"batch_id": 0, "step": 1}, {"edits": [e(1, 0, 1, "A|r")]})
    p = lambda step, edit, ok, kind="retention": {
        "run_id": "r",
        "step": step,
        "edit_id": edit,
        "probe": kind,
        "correct": ok,
    }
    lg.append(
        "probes",
        [
            p(2, 1, True),
            p(2, 2, False),
            p(2, 3, True),  # eval at step 2
            p(4, 1, False),
            p(4, 2, True),
            p(4, 3, True),  # eval at step 4
            p(4, 3, False, "rewrite"),
            p(4, None, False, "known"),  # not retention: ignored
        ],
    )
    m = lambda ev, step, name, v: {"run_id": "r", "eval_id": ev, "step": step, "name": name, "value": v}
    lg.append(
        "metrics",
        [
            m(1, 2, "efficacy", 0.5),
            m(1, 2, "retention", 1.0),
            m(2, 4, "efficacy", 0.75),
            m(2, 4, "retention", 0.9),
            m(2, 4, "specificity", 0.6),
        ],
    )
    lg.flush()
    assert lg.query(
        "SELECT eval_step, age, retention, n_probes FROM forgetting_curve WHERE run_id = 'r'"
    ) == [(2, 0, 1.0, 1), (2, 2, 0.5, 2), (4, 2, 1.0, 1), (4, 4, 0.5, 2)]
    assert lg.query(
        "SELECT fact_key, step, edit_id, superseded_by, superseded_at_step, stopped_holding_at_step "
        "FROM edit_history WHERE run_id = 'r'"
    ) == [("A|r", 0, 1, 3, 2, 4), ("A|r", 2, 3, None, None, None), ("B|r", 0, 2, None, None, 2)]
    assert lg.query(
        "SELECT run_id, method, n_edits, final_step, efficacy, generalization, specificity, fluency, "
        "consistency, retention FROM method_summary ORDER BY run_id"
    ) == [
        ("other", "memit", 1, None, None, None, None, None, None, None),
        ("r", "memit", 3, 4, 0.75, None, 0.6, None, None, 0.9),
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
