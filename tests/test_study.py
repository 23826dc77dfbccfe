"""A study's runs at once (``runtime.concurrent_runs``): what fits a cluster, the same rows as one run
after the other, every row with its run id, one failed run leaving the others going, and a resumed
study redoing only its unfinished runs (after kill -9 of the driver too: the slow test at the end)."""

import os
import signal
import time

import pytest
from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.runtime.board import RunProgress, board_table
from lme_sim.runtime.ray_utils import SHARD_RESOURCE, run_bundles
from lme_sim.runtime.study import RunRow, concurrent_runs, resume_plan, run_demand, runs_that_fit
from lme_sim.scenario import EvaluatorSpec, RuntimeSpec, ScenarioError, load_scenario
from lme_sim.storage.logger import read_only_query
from lme_sim.storage.schema import RUN_TABLES

STUDY = """
name: {name}
model: world:small
data: {{kind: world, n_edits: {n_edits}, seed: 7}}
editor: [{{method: alphaedit}}, {{method: memit}}]
stream: {{batch_size: 5}}
eval: {{every: 2, fluency_prompts: 0, general_ability: {{n: 8}}}}
runtime: {{shards: {shards}, concurrent_runs: {concurrent}}}
db: {db}
"""


def _study(tmp_path, name, concurrent, n_edits=20, shards=1):
    db = tmp_path / name / f"{name}.duckdb"
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, concurrent=concurrent, db=db, n_edits=n_edits, shards=shards))
    return str(path), db


def _final_metrics(db) -> dict:
    """Each run's last evaluation, by editor: {method: {metric: value}}."""
    _, rows = read_only_query(
        db,
        "select r.method, m.name, round(m.value, 4) from metrics m join runs r using (run_id) "
        "where m.eval_id = (select max(eval_id) from metrics x where x.run_id = m.run_id) order by all",
    )
    out = {}
    for method, name, value in rows:
        out.setdefault(method, {})[name] = value
    return out


def _all_metrics(db) -> list[tuple]:
    _, rows = read_only_query(
        db,
        "select r.method, m.eval_id, m.batch_id, m.name, round(m.value, 4), m.n from metrics m "
        "join runs r using (run_id) order by all",
    )
    return rows


def _nothing_twice(db, n_edits=20) -> None:
    """Every run finished with each edit, batch, probe and metric written exactly once."""
    _, runs = read_only_query(db, "select run_id, status from runs")
    assert len(runs) == 2 and all(s == "finished" for _, s in runs), runs
    for sql in (
        "select run_id, count(*), count(distinct edit_id) from edits group by 1",
        "select run_id, count(*), count(distinct batch_id) from batches group by 1",
        "select run_id, count(*), count(distinct (eval_id, name)) from metrics group by 1",
        "select run_id, count(*), count(distinct (eval_id, edit_id, probe, prompt, target)) "
        "from probes group by 1",
    ):
        _, rows = read_only_query(db, sql)
        assert len(rows) == 2 and all(n == d for _, n, d in rows), (sql, rows)
    _, edits = read_only_query(db, "select count(*) from edits")
    assert edits == [(2 * n_edits,)]


# ---- what fits (no Ray) ---------------------------------------------------------------------------
def test_how_many_runs_fit_is_a_function_of_the_clusters_resources():
    cpu = run_demand(RuntimeSpec(shards=2), EvaluatorSpec())
    assert cpu == {SHARD_RESOURCE: 2.0, "CPU": 1.0}  # the editing chain keeps about one core busy
    assert runs_that_fit({"CPU": 2.0, SHARD_RESOURCE: 16.0}, cpu) == 2
    assert runs_that_fit({"CPU": 16.0, SHARD_RESOURCE: 5.0}, cpu) == 2  # the shard slots
    assert runs_that_fit({"CPU": 0.5}, cpu) == 1  # at least one run
    gpu = run_demand(RuntimeSpec(shards=2, gpus=1, evaluators=2), EvaluatorSpec())
    assert gpu == {"GPU": 4.0, "CPU": 1.0}  # 2 shards and 2 evaluators, a GPU each
    assert runs_that_fit({"CPU": 32.0, "GPU": 8.0}, gpu) == 2
    shares = run_demand(RuntimeSpec(shards=3, gpus=0.3, editor={"cpus": 2, "gpus": 0.1}), EvaluatorSpec())
    assert shares == pytest.approx({"GPU": 1.3, "CPU": 2.0})
    assert runs_that_fit({"CPU": 16.0, "GPU": 2.6}, shares) == 2  # 2.6 / 1.3: two, not one
    vllm = run_demand(RuntimeSpec(gpus=1), EvaluatorSpec(backend="vllm", tensor_parallel_size=2))
    assert vllm["GPU"] == 3.0
    assert concurrent_runs("auto", {"CPU": 8.0, SHARD_RESOURCE: 16.0}, cpu, n=3) == 3
    assert concurrent_runs(4, {"CPU": 1.0}, cpu, n=2) == 2 and concurrent_runs(1, {"CPU": 8.0}, cpu, n=5) == 1


def test_a_runs_placement_group_holds_its_editor_and_evaluators():
    more, where = run_bundles(2, [{"num_cpus": 0}, {"num_cpus": 0, "num_gpus": 0.5}, {"num_cpus": 1}])
    assert more == [{"GPU": 0.5}, {"CPU": 1.0}] and where == [None, 2, 3]  # None: on any bundle


def test_concurrent_runs_is_auto_or_a_positive_number(tmp_path):
    base = "name: x\nmodel: world:small\n"
    for value, want in (("auto", "auto"), ("2", 2)):
        (tmp_path / "s.yaml").write_text(base + f"runtime: {{concurrent_runs: {value}}}\n")
        assert load_scenario(tmp_path / "s.yaml").runtime.concurrent_runs == want
    (tmp_path / "s.yaml").write_text(base)
    assert load_scenario(tmp_path / "s.yaml").runtime.concurrent_runs == "auto"
    for bad in ("0", "many", "1.5"):
        (tmp_path / "s.yaml").write_text(base + f"runtime: {{concurrent_runs: {bad}}}\n")
        with pytest.raises(ScenarioError, match="runtime.concurrent_runs"):
            load_scenario(tmp_path / "s.yaml")


def test_resuming_a_study_resumes_its_unfinished_runs_and_starts_the_missing_ones():
    rows = [  # oldest first: study 0a (its memit run failed), then study 0b (killed: memit not started)
        RunRow("st-alphaedit-0a", "alphaedit", 0, "finished"),
        RunRow("st-memit-0a", "memit", 0, "failed"),
        RunRow("st-alphaedit-0b", "alphaedit", 0, "interrupted"),
    ]
    wanted = [("alphaedit", 0), ("memit", 0)]
    todo, start = resume_plan(rows, wanted, "st-0b", "st")  # the latest: every unfinished run
    assert [r.run_id for r in todo] == ["st-memit-0a", "st-alphaedit-0b"] and start == [("memit", 0)]
    todo, start = resume_plan(rows, wanted, "st-0a", "st")  # an earlier study: its own runs only
    assert [r.run_id for r in todo] == ["st-memit-0a"] and start == []
    todo, start = resume_plan(rows[:1], wanted, "st-0a", "st")
    assert todo == [] and start == [("memit", 0)]
    assert resume_plan(rows, [("alphaedit", 1)], "st-0b", "st") == ([], [("alphaedit", 1)])


def test_resuming_a_study_with_no_run_of_it_is_an_error_and_writes_nothing(tmp_path):
    path, db = _study(tmp_path, "none", concurrent=2)
    for args in ([], ["none-0000abcd"]):
        r = CliRunner().invoke(main, ["run", path, "--resume", *args])
        assert r.exit_code == 2 and r.output.count("error:") == 1 and str(db) in r.output, r.output
    assert not db.exists()


def test_the_board_shows_each_runs_progress():
    from rich.console import Console

    rows = {
        "st-memit-0a": RunProgress("memit on world:small", 12, status="editing", position=3, edits=10),
        "st-alphaedit-0a": RunProgress("alphaedit on world:small", 12),
    }
    console = Console(width=200, record=True)
    console.print(board_table(rows, now=time.monotonic()))
    text = console.export_text()
    assert "st-memit-0a" in text and "3/12 (25%)" in text and "editing" in text and "waiting" in text


# ---- studies on Ray ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sequential(tmp_path_factory, ray_session):
    """The study with one run after the other (concurrent_runs 1): its database."""
    path, db = _study(tmp_path_factory.mktemp("sequential"), "seq", concurrent=1)
    r = CliRunner().invoke(main, ["run", path])
    assert r.exit_code == 0, r.output
    return db


def test_runs_at_once_write_the_rows_of_runs_one_after_the_other(tmp_path, sequential):
    path, db = _study(tmp_path, "both", concurrent=2)
    r = CliRunner().invoke(main, ["run", path])
    assert r.exit_code == 0, r.output
    assert "2 runs, 2 at a time" in r.output, r.output
    _nothing_twice(db)
    _nothing_twice(sequential)
    assert _all_metrics(db) == _all_metrics(sequential)  # the same stream, deterministic
    for table in RUN_TABLES:  # one logger for both runs: every row carries its own run's id
        _, ((n, runs, orphans),) = read_only_query(
            db,
            f"select count(*), count(distinct run_id), count(*) filter "
            f"(where run_id is null or run_id not in (select run_id from runs)) from {table}",
        )
        assert orphans == 0 and (n == 0 or runs == 2 or table == "rejected_batches"), (table, n, runs)
    _, ids = read_only_query(db, "select run_id from runs order by run_id")
    assert len({rid.rsplit("-", 1)[1] for (rid,) in ids}) == 1  # one study: one random part
    r = CliRunner().invoke(main, ["run", path, "--resume"])  # every run is finished
    assert r.exit_code == 0 and "nothing to resume" in r.output, r.output


def test_a_failed_run_leaves_the_others_going_and_resume_redoes_only_it(tmp_path, sequential, monkeypatch):
    from lme_sim.runtime import coordinator

    failed_once = tmp_path / "failed-once"

    class MemitFailsOnce(coordinator.EditorService):
        def __init__(self, model_name, shards, spec, **kw):
            super().__init__(model_name, shards, spec, **kw)
            self.method, self.batches = spec.method, 0

        def edit(self, cases):
            self.batches += 1
            if self.method == "memit" and self.batches == 3 and not failed_once.exists():
                failed_once.touch()
                raise RuntimeError("memit fails once, on its third batch")
            return super().edit(cases)

    monkeypatch.setattr(coordinator, "EditorService", MemitFailsOnce)
    path, db = _study(tmp_path, "fails", concurrent=2)
    r = CliRunner().invoke(main, ["run", path])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    _, runs = read_only_query(db, "select method, run_id, status from runs order by method")
    (_, done, s1), (_, broken, s2) = runs
    assert (s1, s2) == ("finished", "failed") and len(errors) == 1 and f"run {broken} stopped" in errors[0]
    assert "RuntimeError" in errors[0] and "Traceback" not in r.output + r.stderr
    mine = "select * from {} where run_id = ? order by all"
    before = {t: read_only_query(db, mine.format(t), [done])[1] for t in (*RUN_TABLES, "runs")}

    r = CliRunner().invoke(main, ["run", path, "--resume"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"resuming {broken} (failed) after batch 1" in said and f"resuming {done}" not in said, r.output
    after = {t: read_only_query(db, mine.format(t), [done])[1] for t in (*RUN_TABLES, "runs")}
    assert after == before  # the finished run is not redone
    _nothing_twice(db)
    assert _all_metrics(db) == _all_metrics(sequential)


# ---- kill -9 of the driver in the middle of a study (minutes on 2 cores) ------------------------------
@pytest.mark.slow
def test_a_study_killed_with_kill_9_resumes_every_unfinished_run(tmp_path, small_world):
    from tests.test_resume import _finish, _lme_sim, _when_unlocked

    whole, whole_db = _study(tmp_path, "whole", concurrent=2, n_edits=50, shards=2)
    ref = _lme_sim("run", whole)
    out = _finish(ref)
    assert ref.returncode == 0, out

    path, db = _study(tmp_path, "killed", concurrent=2, n_edits=50, shards=2)
    victim = _lme_sim("run", path)
    deadline = time.time() + 900
    while len(list((db.parent / "checkpoints").glob("*/batch-000002.pt"))) < 2:  # both runs are going
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0]
        time.sleep(0.3)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and every Ray process it started
    victim.wait()
    runs = _when_unlocked(db, "select run_id, status from runs")
    assert len(runs) == 2 and all(s == "running" for _, s in runs), runs  # lme-sim runs: interrupted
    _, done = read_only_query(db, "select count(*) from edits")
    assert 30 <= done[0][0] < 100

    again = _lme_sim("run", path, "--resume")
    out = _finish(again)
    assert again.returncode == 0, out
    said = " ".join(out.split())
    assert all(f"resuming {rid} (interrupted)" in said for rid, _ in runs), out
    _nothing_twice(db, n_edits=50)
    assert _final_metrics(db) == _final_metrics(whole_db)
    # every evaluation too: one still in flight at the kill is redone (the resume starts from the newest
    # checkpoint whose evaluations had all landed)
    curve = (
        "select r.method, m.eval_id, m.batch_id, m.name, round(m.value, 4) from metrics m "
        "join runs r using (run_id)"
    )
    assert (
        read_only_query(db, curve + " order by all")[1]
        == read_only_query(whole_db, curve + " order by all")[1]
    )
