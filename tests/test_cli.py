
from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.storage.logger import read_only_query


def _write(tmp_path, text, name="scn.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_run_on_ray_logs_to_duckdb(tmp_path, ray_session):
    db = tmp_path / "lme.duckdb"
    scn = _write(tmp_path, f"""
name: tiny
model: world:small
data: {{kind: world, n_edits: 20, seed: 4}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 4}}
runtime: {{shards: 2}}
db: {db}
""")
    r = CliRunner().invoke(main, ["run", scn])
    assert r.exit_code == 0, r.output
    assert "retention" in r.output and str(db) in r.output
    r = CliRunner().invoke(main, ["query", "select count(*) from edits", "--db", str(db)])
    assert r.exit_code == 0 and r.output.splitlines()[-1] == "20"
    _, evals = read_only_query(db, "select eval_id, min(model_version), max(model_version), count(*) "
                                   "from probes group by eval_id order by eval_id")
    # eval k (after batch k) saw exactly model version k and probed every edit so far
    assert evals == [(1, 1, 1, 10), (2, 2, 2, 20)]
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


def _run_two_batches(tmp_path, name, editor, seed):
    """Run 20 small-world edits in 2 batches over 2 shards (evaluated at the end); the DuckDB path."""
    db = tmp_path / f"{name}.duckdb"
    scn = _write(tmp_path, f"""
name: {name}
model: world:small
data: {{kind: world, n_edits: 20, seed: {seed}}}
editor: {editor}
stream: {{batch_size: 10}}
eval: {{every: 2, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
""")
    r = CliRunner().invoke(main, ["run", scn])
    assert r.exit_code == 0, r.output
    return db


def test_a_list_of_methods_runs_the_same_stream_once_each(tmp_path, ray_session):
    db = _run_two_batches(tmp_path, "cmp", "[{method: mose, hparams: {num_steps: 10}}, {method: memit}]", seed=5)
    _, runs = read_only_query(db, "select method, run_id, status from runs order by method")
    assert [m for m, *_ in runs] == ["memit", "mose"] and all(s == "finished" for *_, s in runs)
    assert all(f"cmp-{m}-" in rid for m, rid, _ in runs)
    _, streams = read_only_query(db, "select run_id, list(case_id order by edit_id) from edits group by run_id")
    assert len(streams) == 2 and streams[0][1] == streams[1][1]  # the same stream for both
    _, cond = read_only_query(db, "select r.method, w.module, max(w.condition) / min(w.condition) from weight_stats w "
                                  "join runs r using (run_id) group by all")
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
