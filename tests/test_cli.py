from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.storage.logger import read_only_query

TINY = {"name": "tiny", "model": "world:small", "editor": {"method": "alphaedit"}}  # a run's scenario


def _write(tmp_path, text, name="scn.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_run_on_ray_logs_to_duckdb(tmp_path, ray_session):
    db = tmp_path / "lme.duckdb"
    scn = _write(
        tmp_path,
        f"""
name: tiny
model: world:small
data: {{kind: world, n_edits: 20, seed: 4}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 4}}
runtime: {{shards: 2, cuts: [3]}}
db: {db}
""",
    )
    r = CliRunner().invoke(main, ["run", scn])
    assert r.exit_code == 0, r.output
    assert "layers 0-2 on node" in r.output and "layers 3-3 on node" in r.output, r.output  # runtime.cuts
    assert "retention" in r.output and str(db) in r.output
    # no terminal, no bar: a line per evaluation says how far the run is
    assert ": 10 edits committed" in r.output and ": 20 edits committed" in r.output, r.output
    r = CliRunner().invoke(main, ["query", "select count(*) from edits", "--db", str(db)])
    assert r.exit_code == 0 and r.output.splitlines()[-1] == "20"
    _, evals = read_only_query(
        db,
        "select eval_id, min(batch_id), max(batch_id), count(*) "
        "from probes group by eval_id order by eval_id",
    )
    # eval k (after the k-th batch, batch_id k - 1) saw exactly that model and probed every edit so far
    assert evals == [(1, 0, 0, 10), (2, 1, 1, 20)]
    _, ws = read_only_query(db, "select count(*), min(condition) from weight_stats")
    assert ws[0][0] == 4 and ws[0][1] > 1
    _, metrics = read_only_query(db, "select name, value from metrics where eval_id = 2")
    got = dict(metrics)
    assert got["efficacy"] >= 0.9 and got["retention"] >= 0.9 and "fluency" in got
    r = CliRunner().invoke(main, ["runs", "--db", str(db)])
    assert "tiny-" in r.output and "finished" in r.output


def test_world_build(small_world):
    r = CliRunner().invoke(main, ["world", "build", "--name", "small"])
    assert r.exit_code == 0, r.output
    assert "240 facts" in r.output and "accuracy" in r.output
    r = CliRunner().invoke(main, ["world", "build", "--name", "nope"])
    assert r.exit_code != 0 and "unknown world" in r.output


def _run_two_batches(tmp_path, name, editor, seed, every=2):
    """Run 20 small-world edits in 2 batches over 2 shards (evaluated after every ``every`` batches and
    at the end); the DuckDB path."""
    db = tmp_path / f"{name}.duckdb"
    scn = _write(
        tmp_path,
        f"""
name: {name}
model: world:small
data: {{kind: world, n_edits: 20, seed: {seed}}}
editor: {editor}
stream: {{batch_size: 10}}
eval: {{every: {every}, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
""",
    )
    r = CliRunner().invoke(main, ["run", scn])
    assert r.exit_code == 0, r.output
    return db


def test_a_list_of_methods_runs_the_same_stream_once_each(tmp_path, ray_session):
    """Each editor of a list is its own run on the same stream; one with its own batch_size (its
    protocol) edits in batches of that size and is evaluated at the same edit counts as the others."""
    db = _run_two_batches(
        tmp_path,
        "cmp",
        "[{method: mose, hparams: {num_steps: 10}}, {method: memit}, {method: memit, batch_size: 5}]",
        seed=5,
        every=1,
    )
    label = "regexp_replace(run_id, '-[0-9a-f]+$', '')"  # the run id without its random suffix
    _, runs = read_only_query(db, f"select method, run_id, status from runs order by {label}")
    assert [m for m, *_ in runs] == ["memit", "memit", "mose"] and all(s == "finished" for *_, s in runs)
    assert [rid.rsplit("-", 1)[0] for _, rid, _ in runs] == ["cmp-memit", "cmp-memit-b5", "cmp-mose"]
    _, streams = read_only_query(
        db, "select run_id, list(case_id order by edit_id) from edits group by run_id"
    )
    assert len(streams) == 3 and streams[0][1] == streams[1][1] == streams[2][1]  # the same stream
    _, protocol = read_only_query(
        db,
        "select s.batch_size,"
        " (select list(n_edits order by batch_id) from batches b where b.run_id = s.run_id),"
        " (select list(n_edits order by eval_id) from efficacy_curve c where c.run_id = s.run_id)"
        f" from method_summary s order by {label}",
    )
    assert protocol == [(10, [10, 10], [10, 20]), (5, [5, 5, 5, 5], [10, 20]), (10, [10, 10], [10, 20])]
    ids = [rid for _, rid, _ in runs]
    r = CliRunner().invoke(main, ["compare", *ids, "--db", str(db)])
    assert r.exit_code == 0 and "memit (batch 5)" in r.output and "mose (batch 10)" in r.output, r.output
    _, cond = read_only_query(
        db,
        "select r.method, w.module, max(w.condition) / min(w.condition) from weight_stats w "
        "join runs r using (run_id) group by all",
    )
    ratios = {(m, mod): x for m, mod, x in cond}
    assert all(x < 1 + 1e-5 for (m, _), x in ratios.items() if m == "mose")  # orthogonal: unchanged
    assert len([1 for (m, _) in ratios if m == "mose"]) == 4


def test_hiedit_run_trains_its_router_on_first_use_and_logs_modules_per_edit(tmp_path, ray_session):
    db = _run_two_batches(tmp_path, "hi", "{method: hiedit, hparams: {rollouts: 4}}", seed=6)
    _, rows = read_only_query(db, "select len(modules), len(delta_norms) from edits")
    assert len(rows) == 20 and all(m == 2 and d == 2 for m, d in rows)  # 2 of 4 candidates per edit
    _, usage = read_only_query(db, "select unnest(modules) as module, count(*) from edits group by 1")
    assert sum(n for _, n in usage) == 40
    _, ws = read_only_query(db, "select count(distinct module) from weight_stats")
    assert ws[0][0] == 4


def _db_with_a_run(path, name="tiny", run_id="tiny-0000abcd", method="alphaedit"):
    """A results database holding one run (``name``) with one committed batch; no Ray needed."""
    from lme_sim.storage.logger import RunLogger

    with RunLogger(path) as log:
        log.start_run(
            run_id,
            {"name": name, "model": "world:small", "editor": {"method": method}},
            scenario_path="scn.yaml",
        )
        log.commit_batch(run_id, {"batch_id": 0, "n_edits": 1}, {})
        log.finish_run(run_id)
    return path


def _resume(tmp_path, db, run_id, editor="{method: alphaedit}", name="tiny"):
    """``lme-sim run --resume run_id --db db``: its result, and the db's (bytes, mtime) before and after."""
    scn = _write(
        tmp_path,
        f"name: {name}\nmodel: world:small\ndata: {{kind: world, n_edits: 2, seed: 4}}\n"
        f"editor: {editor}\nstream: {{batch_size: 2}}\nruntime: {{shards: 1}}\ndb: {db}\n",
    )
    state = lambda: (db.read_bytes(), db.stat().st_mtime_ns) if db.exists() else None
    before = state()
    r = CliRunner().invoke(main, ["run", scn, "--db", str(db), "--resume", run_id])
    return r, before, state()


def _one_error_line(r, *words):
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and r.output == errors[0] + "\n", (r.exit_code, r.output)
    assert all(w in errors[0] for w in words), (words, errors[0])


def test_methods_not_in_the_scenario_are_an_error_and_write_nothing(tmp_path):
    db = tmp_path / "m.duckdb"
    scn = _write(
        tmp_path, f"name: m\nmodel: world:small\neditor: [{{method: mose}}, {{method: memit}}]\ndb: {db}\n"
    )
    r = CliRunner().invoke(main, ["run", scn, "--methods", "memit,rome"])
    assert r.exit_code == 2 and "error: --methods" in r.output and "'rome'" in r.output
    assert not db.exists()


def test_resume_of_an_unknown_run_is_an_error_and_writes_nothing(tmp_path):
    db = tmp_path / "none.duckdb"
    r, before, after = _resume(tmp_path, db, "nonexistent-run")
    _one_error_line(r, str(db), "'nonexistent-run'")
    assert before is None and after is None and sorted(p.name for p in tmp_path.iterdir()) == ["scn.yaml"]
    db = _db_with_a_run(tmp_path / "lme.duckdb")
    r, before, after = _resume(tmp_path, db, "nonexistent-run")
    _one_error_line(r, str(db), "'nonexistent-run'")
    assert before == after
    _, runs = read_only_query(db, "select run_id, status from runs")
    assert runs == [("tiny-0000abcd", "finished")]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, monkeypatch):
    """One line saying it is finished, exit code 0, the database untouched, no run started."""
    from lme_sim.runtime import coordinator

    def run_again(*args, **kw):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(coordinator, "run_distributed", run_again)
    db = _db_with_a_run(tmp_path / "lme.duckdb")
    r, before, after = _resume(tmp_path, db, "tiny-0000abcd")
    assert r.exit_code == 0 and r.exception is None, r.output
    assert r.output == f"{db}: run 'tiny-0000abcd' is finished; nothing to resume\n"
    assert before == after


def test_a_run_whose_logger_was_killed_shows_as_interrupted(tmp_path):
    """kill -9 of the process that holds the run's logger: the database still lists the run as
    running; ``lme-sim runs`` shows it as interrupted, and so does the next logger that opens the
    file (it marks it, and a resume of it says what it continues)."""
    import os
    import signal
    import subprocess
    import sys

    from lme_sim.storage.logger import RunLogger

    db = tmp_path / "lme.duckdb"
    logger = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from lme_sim.storage.logger import RunLogger\n"
            "log = RunLogger(sys.argv[1])\n"
            f"log.start_run('tiny-0000abcd', {TINY!r})\n"
            "log.commit_batch('tiny-0000abcd', {'batch_id': 0, 'n_edits': 1}, {})\n"
            "print('committed', flush=True)\n"
            "time.sleep(600)\n",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert logger.stdout.readline() == "committed\n"
    finally:
        os.kill(logger.pid, signal.SIGKILL)
        logger.wait()
    assert read_only_query(db, "select status from runs")[1] == [("running",)]
    r = CliRunner().invoke(main, ["runs", "--db", str(db)])
    assert r.exit_code == 0 and r.output.splitlines()[1].split("\t")[4] == "interrupted", r.output
    with RunLogger(db) as log:
        assert log.start_run("tiny-0000abcd", TINY, resume=True) == ("interrupted")
        assert log.query("select status from runs") == [("running",)]


def test_the_summary_gives_fluency_its_unit(tmp_path):
    """``compare`` (and the end of a run, which prints the same table) names fluency's unit."""
    from lme_sim.storage.logger import RunLogger

    db = tmp_path / "lme.duckdb"
    with RunLogger(db) as log:
        log.start_run("tiny-0000abcd", TINY)
        log.commit_batch("tiny-0000abcd", {"batch_id": 0, "n_edits": 1}, {})
        log.append(
            "metrics",
            [
                {"eval_id": 1, "batch_id": 0, "name": n, "value": v}
                for n, v in (("efficacy", 0.9), ("fluency", 494.612))
            ],
        )
        log.finish_run("tiny-0000abcd")
    r = CliRunner().invoke(main, ["compare", "tiny-0000abcd", "--db", str(db)])
    assert r.exit_code == 0, r.output
    lines = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in r.output.splitlines()
        if line.count("│") == 3
    }
    assert lines["fluency (bits x100)"] == "494.6" and lines["efficacy"] == "0.900", r.output


def test_a_quoted_resume_id_matches_no_run(tmp_path):
    """The id is a query parameter: ``x' or '1'='1`` does not match every run."""
    db = _db_with_a_run(tmp_path / "lme.duckdb")
    for editor in ("{method: alphaedit}", "[{method: mose}, {method: alphaedit}]"):
        r, before, after = _resume(tmp_path, db, "x' or '1'='1", editor=editor)
        _one_error_line(r, str(db), "x' or '1'='1")
        assert before == after


def test_resume_of_another_scenarios_run_is_an_error(tmp_path):
    db = _db_with_a_run(tmp_path / "lme.duckdb", name="other")
    r, before, after = _resume(tmp_path, db, "tiny-0000abcd")
    _one_error_line(r, str(db), "'tiny-0000abcd'", "'other'")
    assert before == after
    db2 = _db_with_a_run(tmp_path / "m.duckdb", method="memit")  # same scenario name, another method
    r, before, after = _resume(tmp_path, db2, "tiny-0000abcd")
    _one_error_line(r, str(db2), "memit")
    assert before == after


def test_read_only_query_takes_parameters(tmp_path):
    db = _db_with_a_run(tmp_path / "lme.duckdb")
    sql = "select status from runs where run_id = ?"
    assert read_only_query(db, sql, ["tiny-0000abcd"])[1] == [("finished",)]
    assert read_only_query(db, sql, ["x' or '1'='1"])[1] == []


def test_stop_run_says_what_it_could_not_do(caplog, tmp_path):
    """Marking the run failed is best effort when a run stops, but a step that fails is a warning naming
    it (not silently passed over); the error itself becomes one line, its traceback a file."""
    import logging

    from lme_sim.runtime.failures import stop_run

    class Gone:  # a logger actor handle whose calls fail, as a dead actor's do
        def __getattr__(self, name):
            raise RuntimeError(f"{name}: the actor is dead")

    class Ray:
        @staticmethod
        def get(ref, timeout=None):
            return ref

    with caplog.at_level(logging.WARNING, logger="lme_sim.runtime.failures"):
        out = stop_run(
            ValueError("a bug"),
            ray=Ray(),
            logger=Gone(),
            run_id="run-1",
            roles={},
            resume_hint="lme-sim run s.yaml --resume run-1",
            log_dir=tmp_path / "logs",
        )
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "run-1" in lines[0] and "the actor is dead" in lines[0], lines
    msg = str(out)
    assert (
        "\n" not in msg
        and "ValueError: a bug" in msg
        and "left as 'running'" in msg
        and "--resume run-1" in msg
    )
    assert "ValueError: a bug" in (tmp_path / "logs" / "run-1.error.txt").read_text()
