"""Runs that lose processes, through the ``lme-sim`` command as a user runs it. Each ends with the same
final metrics as an uninterrupted run (the ``reference`` below):

* kill -9 of the whole run, then ``lme-sim run --resume``: no lost and no duplicated edits;
* a killed evaluator actor: Ray restarts it, it is re-synced, every evaluation is scored once;
* a killed shard, then a killed editor, then a killed logger: each run stops with
  one clear error line, marked failed (left running where the logger itself died), with only whole
  batches committed, and ``--resume`` finishes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lme_sim.storage.logger import read_only_query

SCENARIO = """
name: resumable
model: world:small
data: {{kind: world, n_edits: 50, seed: 7}}
editor: {{method: alphaedit}}
stream: {{batch_size: 5}}
eval: {{every: 2, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
"""


def _lme_sim(*args, **kw):
    exe = Path(sys.executable).with_name("lme-sim")
    return subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _scenario(tmp_path, name):
    db = tmp_path / name / f"{name}.duckdb"
    path = tmp_path / f"{name}.yaml"
    path.write_text(SCENARIO.format(db=db))
    return path, db


def _final_metrics(db):
    _, rows = read_only_query(
        db,
        "select name, round(value, 4) from metrics where eval_id = "
        "(select max(eval_id) from metrics) order by name",
    )
    return dict(rows)


def _every_evaluation(db) -> dict:
    """Every metric of every evaluation, by (eval_id, batch_id, name): the whole curve, each once."""
    _, rows = read_only_query(db, "select eval_id, batch_id, name, round(value, 4) from metrics order by all")
    out = {(e, b, n): v for e, b, n, v in rows}
    assert len(out) == len(rows)
    return out


def _when_unlocked(db, sql, seconds=120):
    """Ray's worker processes notice their raylet is gone and exit; until then the file is locked."""
    deadline = time.time() + seconds
    while True:
        try:
            return read_only_query(db, sql)[1]
        except Exception as e:
            if "lock" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)


def _wait_for_checkpoint(proc, db, batch: int, newer_than: float = 0.0):
    """Until the run has written the checkpoint of ``batch`` (after ``newer_than``)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        found = [
            p
            for p in (db.parent / "checkpoints").glob(f"*/batch-{batch:06d}.pt")
            if p.stat().st_mtime > newer_than
        ]
        if found:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first:\n{proc.communicate()[0]}")
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(proc.communicate()[0])


def _actor_pids(proc, actor: str) -> list[int]:
    """PIDs of the Ray worker processes running ``actor`` (a class name) for this run: the driver
    leads a session that holds every Ray process it started."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getsid(int(d.name)) == proc.pid:
                title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title == f"ray::{actor}" or title.startswith(f"ray::{actor}."):
                    pids.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _kill_actor(proc, actor: str) -> None:
    pids = _actor_pids(proc, actor)
    assert pids, f"no {actor} process in the run's process group"
    os.kill(pids[0], signal.SIGKILL)


def _finish(proc, timeout=900):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def _resume_to_the_end(path, run_id, db) -> str:
    """``lme-sim run --resume``: it finishes, with each of the 50 edits written exactly once; its output."""
    proc = _lme_sim("run", str(path), "--resume", run_id)
    out = _finish(proc)
    assert proc.returncode == 0, out
    _, edits = read_only_query(
        db, "select count(*), count(distinct edit_id), min(edit_id), max(edit_id) from edits"
    )
    assert edits == [(50, 50, 0, 49)]
    _, status = read_only_query(db, "select status from runs")
    assert status == [("finished",)]
    return out


@pytest.fixture(scope="module")
def whole_db(tmp_path_factory, small_world):
    """The database of the scenario run without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    path, db = _scenario(tmp, "whole")
    ref = _lme_sim("run", str(path))
    out = _finish(ref)
    assert ref.returncode == 0, out
    return db


@pytest.fixture(scope="module")
def reference(whole_db):
    """Final metrics of the scenario run without interruption."""
    return _final_metrics(whole_db)


def test_resume_after_kill_9(tmp_path, reference, whole_db):
    path, broken = _scenario(tmp_path, "broken")
    victim = _lme_sim("run", str(path))
    _wait_for_checkpoint(victim, broken, 2)  # batches 0-2 are committed
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    victim.wait()
    runs = _when_unlocked(broken, "select run_id, status from runs")
    ((run_id, status),) = runs
    assert status == "running"
    _, done = read_only_query(broken, "select count(*) from edits")
    assert 15 <= done[0][0] < 50

    _resume_to_the_end(path, run_id, broken)
    assert _final_metrics(broken) == reference
    assert _every_evaluation(broken) == _every_evaluation(whole_db)  # none lost, none twice


def test_a_killed_evaluator_is_restarted_and_every_evaluation_scored_once(tmp_path, reference):
    path, db = _scenario(tmp_path, "evaluator")
    run = _lme_sim("run", str(path))
    _wait_for_checkpoint(run, db, 1)  # evaluations 2..5 are still to come
    _kill_actor(run, "Evaluator")
    out = _finish(run)
    assert run.returncode == 0, out
    said = " ".join(out.split())  # the console wraps long lines
    assert "evaluator 0 was restarted" in said and "re-synced to version" in said, out
    # eval k follows the 2k-th batch (batch_id 2k - 1): one set of rows per eval id, each scored on its
    # own model
    _, evals = read_only_query(
        db,
        "select eval_id, min(batch_id), max(batch_id), count(*), "
        "count(distinct edit_id) from probes group by 1 order by 1",
    )
    assert evals == [(k, 2 * k - 1, 2 * k - 1, 10 * k, 10 * k) for k in range(1, 6)]
    _, metrics = read_only_query(
        db,
        "select eval_id, count(*), count(distinct name), min(batch_id), "
        "max(batch_id) from metrics group by 1 order by 1",
    )
    assert [m[0] for m in metrics] == [1, 2, 3, 4, 5] and all(
        n == d and v == w == 2 * e - 1 for e, n, d, v, w in metrics
    )
    assert _final_metrics(db) == reference


def _stops_cleanly(proc, db, role: str, status: str = "failed") -> tuple[str, int]:
    """The run ended with one error line naming the dead actor and the resume command, no traceback,
    status 'failed', and only whole batches committed. Returns (run id, last committed batch)."""
    out = _finish(proc)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"the {role}" in errors[0] and "--resume" in errors[0], out
    assert "Traceback" not in out, out
    ((run_id, found),) = _when_unlocked(db, "select run_id, status from runs")
    assert found == status and run_id in errors[0]
    _, rows = read_only_query(
        db,
        "select count(*), count(distinct batch_id), max(batch_id), (select count(*) from edits) from batches",
    )
    n_batches, distinct, last, n_edits = rows[0]
    assert n_batches == distinct == last + 1 and n_edits == 5 * n_batches and 1 <= n_batches < 10
    return run_id, last


# slow (2 min: four runs of the CLI, each starting Ray): a killed driver (test_resume_after_kill_9), a killed
# evaluator (below) and a killed logger's status (tests/test_cli.py) stay in make test
@pytest.mark.slow
def test_each_killed_actor_stops_the_run_and_resume_finishes_it(tmp_path, reference):
    """A shard, then the editor, then the logger die in turn, each in a resumed run;
    every death stops the run cleanly (the logger's leaves it "running": nobody is left to mark it;
    ``lme-sim runs`` and the resume show it as interrupted), and the last resume finishes with the
    reference's metrics, redone evaluations replaced."""
    path, db = _scenario(tmp_path, "actors")
    run = _lme_sim("run", str(path))
    _wait_for_checkpoint(run, db, 1)
    _kill_actor(run, "ModelShard")
    run_id, last = _stops_cleanly(run, db, "shard")
    for actor, role, status in (
        ("EditorService", "editor", "failed"),
        ("RunLogger", "logger", "running"),
    ):
        started = time.time()
        again = _lme_sim("run", str(path), "--resume", run_id)
        _wait_for_checkpoint(again, db, last + 1, newer_than=started)  # one more batch, then it dies
        _kill_actor(again, actor)
        found, last = _stops_cleanly(again, db, role, status=status)
        assert found == run_id

    listed = _lme_sim("runs", "--db", str(db))
    out = _finish(listed)
    assert listed.returncode == 0 and out.splitlines()[1].split("\t")[4] == "interrupted", out
    out = _resume_to_the_end(path, run_id, db)
    assert f"resuming {run_id} (interrupted)" in " ".join(out.split()), out
    _, evals = read_only_query(
        db, "select eval_id, count(*) from metrics group by 1 having count(*) <> count(distinct name)"
    )
    assert evals == []  # redone evaluations replaced, not duplicated
    assert _final_metrics(db) == reference
