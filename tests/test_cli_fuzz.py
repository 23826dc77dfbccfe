"""Property-based tests over the CLI's database inputs: whatever ``--db`` points at (a file that is
not DuckDB, a directory, a read-only file, a database of a newer schema version, nothing), whatever
id ``--resume`` names (unknown, quoted, a run of another scenario) and whatever SQL ``query`` gets,
the CLI answers with rows (a valid query) or one ``error:`` line and exit code 2, never a traceback,
and the database is left as it was (bytes, mtime and permissions; nothing created beside it).

The CLI runs in process (click's CliRunner); no Ray starts: every input here is refused before.
Example counts per property: :data:`EXAMPLES` (listed in docs/fault-tolerance.md)."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lme_sim.cli import main
from lme_sim.storage.logger import RunLogger
from lme_sim.storage.schema import SCHEMA_VERSION

RUN_ID, OTHER_ID = "fuzz-0000abcd", "other-1234abcd"
EXAMPLES = {"run_bad_db": 60, "resume": 25, "query_bad_db": 40, "query_any_sql": 80}
BAD_DB = ["not duckdb", "directory", "read-only", "newer schema"]
QUOTED = [
    "x' or '1'='1",
    f"{RUN_ID}' --",
    f"{RUN_ID}'; drop table runs; --",
    "' or 1=1 --",
    '"',
    "\\'",
    f" {RUN_ID}",
    f"{RUN_ID}\n",
    RUN_ID.upper(),
    "%",
    "_",
    "*",
    OTHER_ID,
    "",
]
BAD_SQL = [
    "delete from runs",
    "drop table runs",
    "update runs set status = 'x'",
    "create table t (a int)",
    "insert into runs (run_id) values ('x')",
    "select * from nope",
    "selec 1",
    "",
    "   ",
    "-- only a comment",
    "select 1; drop table runs",
    "attach 'other.duckdb' as o",
    "copy runs to 'out.csv'",
    "copy (select 1) to '{db}'",
    "export database 'dump'",
    "select run_id from runs where run_id = ?",
    "select 'unclosed",
]


def _settings(n):
    return settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A scenario file, a results database with a run of it and one of another scenario, and the same
    database stamped with a newer schema version."""
    d = tmp_path_factory.mktemp("cli-fuzz")
    scn = d / "fuzz.yaml"
    scn.write_text(
        "name: fuzz\nmodel: world:small\ndata: {kind: world, n_edits: 2, seed: 1}\n"
        "editor: {method: alphaedit}\nstream: {batch_size: 2}\nruntime: {shards: 1}\n"
        f"db: {d / 'default.duckdb'}\n"
    )
    db = d / "lme.duckdb"
    with RunLogger(db) as log:
        for run_id, name in ((RUN_ID, "fuzz"), (OTHER_ID, "other")):
            log.start_run(
                run_id,
                {"name": name, "model": "world:small", "editor": {"method": "alphaedit"}},
                scenario_path=str(scn),
            )
            log.commit_batch(run_id, {"batch_id": 0, "n_edits": 2}, {})
            log.finish_run(run_id)
    newer = d / "newer.duckdb"
    shutil.copy(db, newer)
    with RunLogger(newer) as log:
        log.con.execute("update schema_info set version = ?", [SCHEMA_VERSION + 1])
    return {"scenario": str(scn), "db": db, "newer": newer}


def _make(kind: str, where: Path, base: dict, garbage: bytes = b"", version: int = SCHEMA_VERSION + 1):
    """A --db target of ``kind`` under ``where``."""
    path = where / "target.duckdb"
    if kind == "not duckdb":
        path.write_bytes(garbage)
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("a folder, not a database")
    elif kind in ("read-only", "valid"):
        shutil.copy(base["db"], path)
        if kind == "read-only":
            path.chmod(0o444)
    elif kind == "newer schema":
        shutil.copy(base["newer"], path)
        if version != SCHEMA_VERSION + 1:
            con = duckdb.connect(str(path))
            con.execute("update schema_info set version = ?", [version])
            con.close()
    elif kind != "missing":
        raise ValueError(kind)
    return path


def _state(where: Path) -> dict:
    """Everything under ``where``: each path's bytes (files), mtime and permission bits."""
    out = {}
    for p in sorted(where.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(where))] = (
            p.read_bytes() if p.is_file() else None,
            st_.st_mtime_ns,
            stat.S_IMODE(st_.st_mode),
        )
    return out


def _one_error(r, *words) -> str:
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.output, r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and r.output == errors[0] + "\n", (r.exit_code, r.output)
    assert "Traceback" not in r.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _in_tmp(fn):
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        try:
            return fn(where)
        finally:
            for p in [where, *where.rglob("*")]:  # a read-only file or folder must not stop the clean-up
                if not p.is_symlink():
                    p.chmod(0o755 if p.is_dir() else 0o644)


garbage = st.binary(max_size=4096) | st.sampled_from([b"", b"DUCK" * 8, b"SQLite format 3\x00" + bytes(84)])
versions = st.integers(SCHEMA_VERSION + 1, 2**31 - 1)


@_settings(EXAMPLES["run_bad_db"])
@given(st.sampled_from(BAD_DB), garbage, versions, st.none() | st.sampled_from([RUN_ID, "nonexistent-run"]))
def test_run_refuses_a_database_it_cannot_write(base, kind, data, version, resume):
    def check(where):
        db = _make(kind, where, base, data, version)
        before = _state(where)
        args = ["run", base["scenario"], "--db", str(db)] + ([f"--resume={resume}"] if resume else [])
        _one_error(CliRunner().invoke(main, args), str(db))
        assert _state(where) == before

    _in_tmp(check)


@_settings(EXAMPLES["resume"])
@given(
    # "" is the bare flag (``--resume=``: the scenario's latest study), tested in tests/test_study.py
    st.sampled_from([q for q in QUOTED if q])
    | st.text(min_size=1, max_size=30).filter(lambda s: s != RUN_ID),
    st.sampled_from(["valid", "missing"]),
)
def test_resume_of_a_run_not_of_this_scenario_in_this_database(base, run_id, kind):
    def check(where):
        db = _make(kind, where, base)
        before = _state(where)
        r = CliRunner().invoke(main, ["run", base["scenario"], "--db", str(db), f"--resume={run_id}"])
        _one_error(r, str(db), repr(run_id))
        assert _state(where) == before  # a missing database is not created either

    _in_tmp(check)


@_settings(EXAMPLES["query_bad_db"])
@given(
    st.sampled_from(["not duckdb", "directory", "newer schema", "missing"]),
    garbage,
    versions,
    st.sampled_from(["select * from runs", "select count(*) from edits", "show tables"]),
)
def test_query_on_a_database_it_cannot_read(base, kind, data, version, sql):
    def check(where):
        db = _make(kind, where, base, data, version)
        before = _state(where)
        _one_error(CliRunner().invoke(main, ["query", "--db", str(db), "--", sql]), str(db))
        _one_error(CliRunner().invoke(main, ["runs", "--db", str(db)]), str(db))
        for cmd in (
            ["compare", RUN_ID],
            ["export", RUN_ID, "--out", str(where / "out")],
            ["report", RUN_ID, "--out", str(where / "report")],
        ):
            _one_error(CliRunner().invoke(main, [*cmd, "--db", str(db)]), str(db))
        # as a source of ``import`` (the target not created), and as its target
        _one_error(CliRunner().invoke(main, ["import", str(db), "--db", str(where / "all.duckdb")]), str(db))
        if kind != "missing":  # a missing target is created
            _one_error(CliRunner().invoke(main, ["import", str(base["db"]), "--db", str(db)]), str(db))
        assert _state(where) == before

    _in_tmp(check)


@_settings(EXAMPLES["query_any_sql"])
@given(st.sampled_from(BAD_SQL) | st.text(max_size=60), st.sampled_from(["valid", "read-only"]))
def test_query_with_any_sql_answers_rows_or_one_error_and_writes_nothing(base, sql, kind):
    def check(where):
        db = _make(kind, where, base)
        before = _state(where)
        os.chdir(where)  # files that SQL names by a relative path would land beside the database: none may
        r = CliRunner().invoke(main, ["query", "--db", str(db), "--", sql.replace("{db}", str(db))])
        if sql in BAD_SQL or r.exit_code != 0:
            _one_error(r, str(db))
        else:
            assert r.exception is None and "error:" not in r.output, r.output
        assert _state(where) == before

    cwd = os.getcwd()
    try:
        _in_tmp(check)
    finally:
        os.chdir(cwd)


def test_the_bases_are_what_the_properties_assume(base):
    """Guards the properties above: the valid database answers, and the run to resume is there."""
    sql = (
        "select run_id, scenario->>'$.editor.method' from runs order by 1"  # JSON: no extension from outside
    )
    r = CliRunner().invoke(main, ["query", "--db", str(base["db"]), sql])
    assert r.exit_code == 0, r.output
    assert r.output.split()[-4:] == [RUN_ID, "alphaedit", OTHER_ID, "alphaedit"], r.output
    r = CliRunner().invoke(main, ["query", "--db", str(base["newer"]), "select 1"])
    _one_error(r, "schema version")
