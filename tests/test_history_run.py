"""The dated change-history scenario on Ray: updates supersede earlier edits, the latest value wins."""

from lme_sim.runtime.coordinator import run_distributed, scenario_events
from lme_sim.scenario import load_scenario
from lme_sim.storage.logger import read_only_query
from lme_sim.stream import latest_values


def test_dated_history_latest_value_wins(tmp_path, ray_session):
    db = tmp_path / "history.duckdb"
    path = tmp_path / "history.yaml"
    path.write_text(f"""
name: history
model: world:small
data: {{kind: world}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10, timeline: {{pattern: history, eval_every: 20}}}}
eval: {{fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
""")
    scn = load_scenario(path)
    events = scenario_events(scn)
    n_edits = sum(e.is_edit for e in events)
    run_id = run_distributed(scn, str(path))
    _, rows = read_only_query(
        db,
        "select count(*), count(*) filter (where kind = 'update'), "
        "count(*) filter (where supersedes is not null) from edits",
    )
    assert rows[0][0] == n_edits and rows[0][1] > 0 and rows[0][1] == rows[0][2]
    # every superseded edit names its successor in the edit_history view
    _, chains = read_only_query(db, "select count(*) from edit_history where superseded_by is not null")
    assert chains[0][0] == rows[0][2]
    # final evaluation: one retention probe per fact, on its latest value, and most of them hold
    _, probes = read_only_query(
        db, "select prompt, target, correct from probes where eval_id = (select max(eval_id) from probes)"
    )
    latest = latest_values(events)
    assert len(probes) == len(latest)
    assert sorted(t for _, t, _ in probes) == sorted(latest.values())
    assert sum(c for *_, c in probes) / len(probes) >= 0.9
    _, versions = read_only_query(
        db, "select eval_id, min(batch_id) = max(batch_id) from probes group by eval_id"
    )
    assert all(same for _, same in versions)
    assert run_id.startswith("history-")
