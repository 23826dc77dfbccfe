"""The runtime under time and load: the simulated clock's speed-up end to end, a bounded evaluation
queue (the editor waits, and says so), pending evaluations that pin no model state, and an evaluator
that keeps dying failing the run cleanly."""

import json
import os
import time

import pytest
import torch

from lme_sim.runtime import coordinator
from lme_sim.runtime.evaluation import EvalPool
from lme_sim.runtime.failures import RunFailed
from lme_sim.runtime.services import Evaluator
from lme_sim.scenario import Scenario
from lme_sim.storage.logger import read_only_query


def _scenario(tmp_path, name, **fields) -> Scenario:
    base = {
        "name": name,
        "model": "world:small",
        "data": {"kind": "world", "n_edits": 15, "seed": 4},
        "editor": {"method": "memit"},
        "stream": {"batch_size": 5},
        "eval": {"every": 1, "fluency_prompts": 0, "general_ability": {"n": 0}},
        "runtime": {"shards": 1},
        "db": str(tmp_path / f"{name}.duckdb"),
    }
    for key, value in fields.items():
        base[key] = {**base.get(key, {}), **value}
    return Scenario.model_validate(base)


def _batches(db) -> list[tuple]:
    _, rows = read_only_query(
        db, "select batch_id, epoch(committed_at), timings from batches order by batch_id"
    )
    return [(b, t, json.loads(timings) if isinstance(timings, str) else timings) for b, t, timings in rows]


def test_speedup_paces_the_run_in_wall_time(tmp_path, ray_session):
    """Batches one simulated day apart at 28,800 simulated seconds per wall second are due 3 s apart
    from the clock's start. A batch is never early, only late (a loaded machine), so the clock holds the
    batches back: batch 3 is due 9 s in, and 4 batches of 5 on the small world take about a second
    each at most, so the stream waits (``pace_wait``) for seconds in all (9 s minus the editing before
    batch 3); unpaced it never waits."""
    scn = _scenario(
        tmp_path,
        "paced",
        data={"n_edits": 20},
        stream={
            "speedup": 28800.0,
            "timeline": {
                "pattern": "fixed",
                "n_batches": 4,
                "batch_size": 5,
                "interval": "1d",
                "eval_every": 5,
            },
        },
    )
    coordinator.run_distributed(scn, "paced.yaml")
    batches = _batches(scn.db)
    times = [t for _, t, _ in batches]
    waits = [timings.get("pace_wait", 0.0) for *_, timings in batches]
    assert len(times) == 4 and sum(waits) > 2, (times, waits)
    assert times[-1] - times[0] >= max(waits[1:]) - 0.5  # a wait delays its batch past batch 0


class SlowEvaluator(Evaluator):  # defined here: Ray ships it to the evaluator actors by value
    def evaluate(self, req, version=None):
        time.sleep(3)
        return super().evaluate(req, version)


def test_a_full_evaluation_queue_makes_the_editor_wait(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(coordinator, "Evaluator", SlowEvaluator)
    scn = _scenario(tmp_path, "queued", eval={"max_pending": 1})
    coordinator.run_distributed(scn, "queued.yaml")
    waits = [timings.get("eval_wait", 0.0) for _, _, timings in _batches(scn.db)]
    assert waits[0] == 0.0 and all(w >= 1.0 for w in waits[1:]), waits
    _, evals = read_only_query(scn.db, "select count(distinct eval_id) from metrics")
    assert evals == [(3,)]


class _Ref:
    def __init__(self, value):
        self.value = value


class _FakeRay:
    """Just enough of Ray for EvalPool: calls run at once, refs are done."""

    def wait(self, refs, num_returns=1, timeout=None):
        return refs, []

    def get(self, ref):
        return [r.value for r in ref] if isinstance(ref, list) else ref.value


class _Remote:
    def __init__(self, fn):
        self.remote = lambda *a, **k: _Ref(fn(*a, **k))


class _FakeEvaluator:
    def __init__(self):
        self.calls = []
        for name in ("evaluate", "follow", "load"):
            setattr(self, name, _Remote(lambda *a, name=name, **k: self.calls.append((name, a, k))))


def test_pending_evaluations_pin_no_model_state():
    """The pool keeps the current accumulated deltas and the batch deltas since the oldest pending
    evaluation, from which an older version's state is rebuilt exactly (re-syncing a restarted evaluator)."""
    pool = EvalPool(_FakeRay(), [_FakeEvaluator()], max_pending=2)
    gen = torch.Generator().manual_seed(0)
    cum, states = {}, {0: {}}
    for version in range(1, 6):
        d = {"w": torch.randn(4, 4, generator=gen)}
        cum = {"w": cum["w"] + d["w"] if cum else d["w"].clone()}
        states[version] = cum
        if version == 2:
            pool.submit(type("R", (), {"eval_id": 1})())  # an evaluation of version 1 stays pending
        pool.follow(d, version, cum)
    assert not any(hasattr(p, "cum") for p in pool.pending)
    assert sorted(pool._log) == [2, 3, 4, 5]  # batches after the pending evaluation's version only
    for v in (1, 3, 5):
        assert torch.allclose(pool.cum_at(v)["w"], states[v]["w"], atol=1e-6)
    pool.pending.clear()
    pool.collect(wait=False)
    assert pool._log == {}


class DyingEvaluator(Evaluator):  # every evaluation kills its process
    def evaluate(self, req, version=None):
        os._exit(1)


def test_an_evaluator_that_exhausts_its_restarts_fails_the_run_cleanly(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(coordinator, "Evaluator", DyingEvaluator)
    monkeypatch.setattr(coordinator, "RESTARTABLE", {"max_restarts": 1, "max_task_retries": -1})
    scn = _scenario(tmp_path, "dying")
    with pytest.raises(RunFailed) as err:
        coordinator.run_distributed(scn, "dying.yaml")
    line = str(err.value)
    assert "\n" not in line and "the evaluator 0 actor died" in line and "--resume" in line, line
    _, status = read_only_query(scn.db, "select status from runs")
    assert status == [("failed",)]


class EditorDyingAtBatch5(coordinator.EditorService):  # the editor's process dies in its 5th batch
    def edit(self, cases):
        self.n = getattr(self, "n", 0) + 1
        if self.n == 5:
            os._exit(1)
        return super().edit(cases)


class LaterEvaluationsSlow(Evaluator):  # the evaluations from the 3rd on take 5 s more
    def evaluate(self, req, version=None):
        if req.eval_id >= 3:
            time.sleep(5)
        return super().evaluate(req, version)


def test_checkpoints_every_n_batches_and_resume_loses_no_evaluation(tmp_path, ray_session, monkeypatch):
    """checkpoint_every 2: only batches 1 and 3 (and the last) write a checkpoint, with the editor's
    state. Killed in batch 4 (the 5th) with the evaluations after batches 2 and 3 still in flight
    (eval k follows batch k - 1), batch 3's checkpoint is ahead of an evaluation that never landed:
    the run resumes from batch 1's, whose evaluations all landed, replaces the rows after it and
    replays batches 2-4 and their evaluations: the same rows and every evaluation as a run never
    interrupted. (Resuming from the newest checkpoint lost evaluation 3 for good.)"""
    fields = {"data": {"n_edits": 25}, "editor": {"method": "alphaedit"}, "runtime": {"checkpoint_every": 2}}
    whole = _scenario(tmp_path, "whole", **fields)
    coordinator.run_distributed(whole, "whole.yaml")
    checkpoints = "select batch_id from batches where checkpoint is not null order by 1"
    assert read_only_query(whole.db, checkpoints)[1] == [(1,), (3,), (4,)]

    broken = _scenario(tmp_path, "broken", **fields)
    monkeypatch.setattr(coordinator, "EditorService", EditorDyingAtBatch5)
    monkeypatch.setattr(coordinator, "Evaluator", LaterEvaluationsSlow)
    with pytest.raises(RunFailed, match="the editor actor died") as err:
        coordinator.run_distributed(broken, "broken.yaml")
    run_id = str(err.value).split()[1]
    _, done = read_only_query(broken.db, "select max(batch_id), count(*) from edits")
    assert done == [(3, 20)] and read_only_query(broken.db, checkpoints)[1] == [(1,), (3,)]
    _, landed = read_only_query(broken.db, "select distinct eval_id from metrics order by 1")
    assert (1,) in landed and (3,) not in landed  # batch 1's checkpoint is complete, batch 3's is not
    monkeypatch.setattr(coordinator, "Evaluator", Evaluator)
    coordinator.run_distributed(broken, "broken.yaml", resume=run_id)

    def rows(db):
        _, edits = read_only_query(db, "select edit_id, batch_id, delta_norms from edits order by 1")
        _, metrics = read_only_query(
            db, "select eval_id, batch_id, name, round(value, 4), n from metrics order by 1, 3"
        )
        return edits, metrics

    (e1, m1), (e2, m2) = rows(whole.db), rows(broken.db)
    assert [e[:2] for e in e1] == [e[:2] for e in e2] and len(e2) == 25
    assert all(abs(a - b) < 1e-4 for x, y in zip(e1, e2) for a, b in zip(x[2], y[2]))
    assert m1 == m2


def test_a_run_under_nohup_says_how_far_it_is_between_evaluations(monkeypatch):
    """With no bar drawn (output to a file), a line per evaluation, and one after a batch only when
    ``every_s`` passed since the last line: a run one edit at a time is not silent for hours."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    out = io.StringIO()
    run = SimpleNamespace(
        console=Console(file=out, force_terminal=False, width=200),
        state=SimpleNamespace(committed=list(range(3))),
        events=list(range(10)),
        id="r",
        _started=time.perf_counter(),
    )
    coordinator.Run._progress_line(run, 3, every_s=3600)  # a batch, too soon: nothing
    assert out.getvalue() == ""
    coordinator.Run._progress_line(run, 3)  # an evaluation: always
    assert "r: 3 edits committed, event 3 of 10" in out.getvalue()
    run.state.committed.append(3)
    run._last_line = (time.perf_counter() - 3601, 3)  # an hour since that line
    coordinator.Run._progress_line(run, 4, every_s=3600)
    assert "r: 4 edits committed, event 4 of 10" in out.getvalue().splitlines()[-1]
