"""Every row of every table of a run carries its ``run_id``, also after a rejected batch and a resume."""

import pytest

from lme_sim.runtime.failures import RunFailed
from lme_sim.runtime.services import EditorService
from lme_sim.storage.logger import read_only_query
from lme_sim.storage.schema import TABLES

RUN_TABLES = sorted(t for t, cols in TABLES.items() if "run_id VARCHAR" in cols and t != "bench_results")


def test_every_row_of_a_rejected_and_resumed_run_carries_its_run_id(tmp_path, ray_session, monkeypatch):
    """30 edits in batches of 10 on 2 shards: the batch of edits 10-19 is always rejected (NaN delta),
    the batch of edits 20-29 fails once (the run stops, marked failed), and ``--resume`` finishes it
    from the checkpoint of batch 0, replaying the rejection."""
    from lme_sim.runtime import coordinator
    from lme_sim.scenario import load_scenario

    failed_once = tmp_path / "failed-once"
    db = tmp_path / "ids.duckdb"
    path = tmp_path / "ids.yaml"
    path.write_text(f"""
name: ids
model: world:small
data: {{kind: world, n_edits: 30, seed: 9}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
""")
    scn = load_scenario(path)
    edit_id = {e.case.case_id: e.edit_id for e in coordinator.scenario_events(scn) if e.is_edit}

    class RejectOneBatchFailOnce(EditorService):  # defined here: Ray ships it to the editor actor by value
        def edit(self, cases):
            first = edit_id[cases[0].case_id]
            if first == 20 and not failed_once.exists():
                failed_once.touch()
                raise RuntimeError("this editor fails once, on the batch of edits 20-29")
            if first != 10:
                return super().edit(cases)
            real, calls = self.editor.solve, []

            def solve(layer, K, R):  # the second layer's delta becomes NaN
                calls.append(layer)
                return real(layer, K, R) * (float("nan") if len(calls) == 2 else 1.0)

            self.editor.solve = solve
            try:
                return super().edit(cases)
            finally:
                del self.editor.solve

    monkeypatch.setattr(coordinator, "EditorService", RejectOneBatchFailOnce)
    with pytest.raises(RunFailed, match="RuntimeError"):
        coordinator.run_distributed(scn, str(path))
    ((run_id, status),) = read_only_query(db, "select run_id, status from runs")[1]
    assert status == "failed"
    assert coordinator.run_distributed(scn, str(path), resume=run_id) == run_id

    _, rejected = read_only_query(db, "select run_id, after_batch, edit_ids from rejected_batches")
    assert rejected == [(run_id, 0, list(range(10, 20)))]  # rolled back on resume, then rejected again
    assert "rejected_batches" in RUN_TABLES and "probes" in RUN_TABLES and len(RUN_TABLES) == 7
    for table in RUN_TABLES:
        _, ((n, mine),) = read_only_query(
            db, f"select count(*), count(*) filter (where run_id = ?) from {table}", [run_id]
        )
        assert n > 0 and mine == n, (table, n, mine)
