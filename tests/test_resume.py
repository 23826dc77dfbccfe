"""kill -9 mid-run, then ``lme-sim run --resume``: no lost and no duplicated edits, and the same
final metrics as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lme_sim.storage.logger import read_only_query

SCENARIO = """
name: resumable
model: world:small
data: {{kind: world, n_edits: 50, seed: 7}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
"""


def _lme_sim(*args, **kw):
    exe = Path(sys.executable).with_name("lme-sim")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _final_metrics(db):
    _, rows = read_only_query(db, "select name, round(value, 4) from metrics where eval_id = "
                                  "(select max(eval_id) from metrics) order by name")
    return dict(rows)


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


def test_resume_after_kill_9(tmp_path, small_world):
    whole, broken = tmp_path / "a" / "whole.duckdb", tmp_path / "b" / "broken.duckdb"
    for db in (whole, broken):
        (tmp_path / f"{db.stem}.yaml").write_text(SCENARIO.format(db=db))

    ref = _lme_sim("run", str(tmp_path / "whole.yaml"))
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out

    victim = _lme_sim("run", str(tmp_path / "broken.yaml"), start_new_session=True)
    ckpts = broken.parent / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:  # batch 2's checkpoint exists: batches 0 and 1 are committed
        if len(list(ckpts.glob("*/batch-000002.pt"))) > 0:
            break
        time.sleep(0.5)
    else:
        victim.kill()
        raise AssertionError(victim.communicate()[0])
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    victim.wait()
    runs = _when_unlocked(broken, "select run_id, status from runs")
    (run_id, status), = runs
    assert status == "running"
    _, done = read_only_query(broken, "select count(*) from edits")
    assert 20 <= done[0][0] < 50

    again = _lme_sim("run", str(tmp_path / "broken.yaml"), "--resume", run_id)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    _, edits = read_only_query(broken, "select count(*), count(distinct edit_id), min(edit_id), max(edit_id) from edits")
    assert edits == [(50, 50, 0, 49)]
    _, status = read_only_query(broken, "select status from runs")
    assert status == [("finished",)]
    assert _final_metrics(broken) == _final_metrics(whole)
