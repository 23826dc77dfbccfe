"""``lme-sim bench`` on a tiny configuration: every section's rows reach the JSON file and the
``bench_results`` table, each with the machine and the versions. No timing is asserted."""

import dataclasses
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from lme_sim.bench import (
    QUICK,
    SMOLLM2,
    BenchError,
    bench_cases,
    bench_config,
    bench_probe_set,
    case_probe_set,
    data_cases,
    run_bench,
)
from lme_sim.bench_tables import print_result
from lme_sim.cli import main
from lme_sim.editors.base import PHASES
from lme_sim.storage.logger import read_only_query
from lme_sim.vllm_scorer import vllm_available

TINY = dataclasses.replace(
    QUICK,
    methods=("memit", "rledit"),
    batch_sizes=(2,),
    probes=40,
    probe_batch_size=16,
    history_batch_size=2,
    history_marks=(1, 2, 4),
    shard_counts=(1, 2),
    shard_edits=4,
    shard_batch_size=2,
)


def test_bench_writes_every_section(tmp_path, ray_session):
    out, db = tmp_path / "bench.json", tmp_path / "bench.duckdb"
    result = run_bench(TINY, out, db, console=Console(quiet=True))
    saved = json.loads(out.read_text())
    assert saved["bench_id"] == result["bench_id"] and saved["preset"] == "quick"
    m, v = saved["machine"], saved["versions"]
    assert (
        m["cpu_cores"] >= 1 and m["ram_gb"] > 0 and m["cpu_model"] and "gpus" in m and "load_avg_1m_end" in m
    )
    assert v["torch"] and v["transformers"] and v["ray"] and v["duckdb"] and v["python"]
    assert "lme_sim_commit" in v and "vllm" in v
    rows = saved["results"]
    by = {s: [r for r in rows if r["section"] == s] for s in ("edits", "probes", "history", "shards")}

    edits = {r["method"]: r for r in by["edits"]}
    assert set(edits) == {"memit", "rledit"}
    for r in edits.values():
        assert r["status"] == "ok" and r["n"] == 2 and r["batch_size"] == 2 and r["rate"] > 0
        assert set(r["phases"]) <= set(PHASES) and "sync" in r["phases"] and r["peak_rss_mb"] > 0
    assert set(edits["memit"]["phases"]) == {"keys", "targets", "solve", "apply", "sync"}
    assert "quick budget" in edits["rledit"]["note"]

    probes = {r["backend"]: r for r in by["probes"]}
    assert probes["hf"]["status"] == "ok" and probes["hf"]["n"] == 40 and probes["hf"]["rate"] > 0
    assert probes["hf"]["phases"]["sync"] > 0
    assert probes["vllm"]["status"] in (("ok", "failed") if vllm_available() else ("unavailable",))

    history = by["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert all(r["method"] == "alphaedit" and r["seconds"] > 0 for r in history)
    # AlphaEdit's state is a fixed-size covariance: the same size after every batch
    assert history[0]["state_mb"] > 0 and len({r["state_mb"] for r in history}) == 1

    shards = by["shards"]
    assert [r["shards"] for r in shards] == [1, 2]
    for r in shards:
        _, runs = read_only_query(
            db,
            f"select status, (select count(*) from batches b where b.run_id = r.run_id) "
            f"from runs r where run_id = '{r['run_id']}'",
        )
        assert runs == [("finished", 2)]
        assert r["n"] == 2 and r["rate"] > 0  # the first batch (actors starting) is not timed
        assert {"keys", "targets", "solve", "apply"} <= set(r["phases"])

    _, stored = read_only_query(
        db,
        "select section, status, json_extract(machine, '$.cpu_cores'), "
        "json_extract_string(versions, '$.torch') from bench_results "
        f"where bench_id = '{result['bench_id']}'",
    )
    assert len(stored) == len(rows) == 2 + 2 + 4 + 2
    assert all(int(c) == m["cpu_cores"] and t == v["torch"] for _, _, c, t in stored)
    _, n_history = read_only_query(db, "select count(*) from bench_results where section = 'history'")
    assert n_history == [(4,)]

    console = Console(record=True, width=160)
    print_result(saved, console)
    text = console.export_text()
    for title in ("editing throughput", "evaluator throughput", "history scaling", "shard scaling"):
        assert title in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "memit,rome"], "--methods: unknown 'rome'"),
        (["--batch-sizes", "1,x"], "--batch-sizes: comma-separated whole numbers"),
        (["--batch-sizes", "0"], "--batch-sizes: edits per batch must be positive"),
        (["--sections", "edits,speed"], "--sections: unknown 'speed'"),
        (["--device", "tpu"], "--device"),
        (["--threads", "0"], "--threads: at least 1"),
    ],
)
def test_bench_rejects_bad_options(args, message):
    r = CliRunner().invoke(main, ["bench", "--quick", *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_bench_config_presets():
    cfg = bench_config(quick=True, methods="ft, mose", device="cpu")
    assert cfg.model == "world:small" and cfg.methods == ("ft", "mose") and cfg.learned_hparams
    assert bench_config(device="cpu").model == "world:default"
    with pytest.raises(BenchError, match="shard_counts"):
        from lme_sim.bench import check_config

        check_config(dataclasses.replace(cfg, shard_counts=(1, 8)))


def test_bench_command_prints_the_table(tmp_path, small_world):
    out, db = tmp_path / "b.json", tmp_path / "b.duckdb"
    r = CliRunner().invoke(
        main,
        ["bench", "--quick", "--sections", "probes", "--device", "cpu", "--out", str(out), "--db", str(db)],
    )
    assert r.exit_code == 0, r.output
    assert "evaluator throughput" in r.output and "bench_results" in r.output
    assert [x["backend"] for x in json.loads(out.read_text())["results"]] == ["hf", "vllm"]


# ---- a real model: cases and probes from a CounterFact file (no model is loaded here) ----------------


def _counterfact(path, n: int):
    """A tiny CounterFact file in the flat format of ../shared/data/counterfact-edit.json."""
    records = [
        {
            "case_id": i,
            "prompt": f"The mother tongue of Person {i} is",
            "target_new": "English",
            "subject": f"Person {i}",
            "ground_truth": "French",
            "rephrase_prompt": f"Where Person {i} is from, people speak the language of",
            "locality_prompt": f"Neighbor {i} is a native speaker of",
            "locality_ground_truth": "Dutch",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def test_counterfact_cases_and_probes(tmp_path):
    path = str(_counterfact(tmp_path / "cf.json", 3))
    cases = data_cases(path, 7)  # a file shorter than asked for is repeated
    assert [c.case_id for c in cases] == ["0", "1", "2", "0", "1", "2", "0"]
    assert cases[1].prompt == "The mother tongue of Person 1 is" and cases[1].target_new == "English"
    prompts, targets = case_probe_set(cases[:3], 8)
    assert prompts[:3] == [
        "The mother tongue of Person 0 is",
        "Where Person 0 is from, people speak the language of",
        "Neighbor 0 is a native speaker of",
    ]
    assert targets[:3] == ["French", "French", "Dutch"]  # before the edits: true objects, neighbors' answers
    assert len(prompts) == len(targets) == 8 and prompts[5] == "Neighbor 1 is a native speaker of"
    assert case_probe_set(cases[:1], 5)[0][3:] == prompts[:2]  # repeated as needed

    cfg = bench_config(model="smollm2-135m", data=path, sections="edits,probes", device="cpu")
    assert (cfg.preset, cfg.methods, cfg.batch_sizes, cfg.shards_method) == (
        "smollm2",
        ("ultraedit",),
        (100,),
        "ultraedit",
    )
    assert cfg.data == path and cfg.probes == 2000 and cfg.shard_counts == (2,)
    # the sections' plumbing: lm is not needed where the cases come from the file
    assert [c.case_id for c in bench_cases(cfg, None, 4)] == ["0", "1", "2", "0"]
    assert bench_probe_set(cfg, None, 10)[0][9] == "The mother tongue of Person 0 is"
    with pytest.raises(BenchError, match="--data: 3 CounterFact records .* shards section edits 400"):
        bench_config(model="smollm2-135m", data=path, device="cpu")
    overridden = bench_config(
        model="smollm2-135m", data=path, methods="memit", batch_sizes="10", sections="edits", device="cpu"
    )
    assert overridden.methods == ("memit",) and overridden.batch_sizes == (10,)
    assert SMOLLM2.sections == ("edits", "probes", "shards") and SMOLLM2.shard_edits == 400


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "smollm2-135m"], "error: --data: smollm2-135m edits CounterFact cases"),
        (["--model", "smollm2-135m", "--data", "{tmp}/missing.json"], "error: --data: counterfact: file"),
        (
            ["--model", "smollm2-135m", "--data", "{tmp}/bad.json"],
            "error: --data: {tmp}/bad.json: invalid JSON",
        ),
        (["--model", "smollm2-135m", "--data", "{tmp}/empty.json"], "error: --data: no CounterFact records"),
        (["--data", "{tmp}/cf.json"], "error: --data: a world model edits its own facts"),
        (
            ["--model", "smollm2-135m", "--data", "{tmp}/cf.json", "--sections", "history"],
            "error: --sections: history runs on world models only",
        ),
        (["--model", "world:nope"], "error: --model: unknown world 'world:nope'"),
        (["--model", "{tmp}"], "is not a registered model"),
        (["--model", "smollm2-135m", "--quick", "--data", "{tmp}/cf.json"], "error: --quick"),
    ],
)
def test_bench_rejects_bad_model_or_data(tmp_path, args, message):
    _counterfact(tmp_path / "cf.json", 3)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("[]")
    out = tmp_path / "out" / "b.json"
    args = [a.format(tmp=tmp_path) for a in args]
    r = CliRunner().invoke(main, ["bench", *args, "--out", str(out), "--db", str(tmp_path / "out" / "b.db")])
    assert r.exit_code == 2, r.output
    assert r.stdout == "" and r.stderr.splitlines() == [r.stderr.strip()], r.output  # one line
    assert r.stderr.startswith("error: ") and message.format(tmp=tmp_path) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_bench_world_edits_and_probes_in_process(tmp_path, small_world):
    """The generic path on a world model, without Ray: UltraEdit's edits and HF probes."""
    cfg = dataclasses.replace(
        TINY, methods=("ultraedit",), sections=("edits", "probes"), backends=("hf",), device="cpu"
    )
    result = run_bench(cfg, tmp_path / "b.json", tmp_path / "b.duckdb", console=Console(quiet=True))
    edits, probes = result["results"]
    assert (edits["section"], edits["model"], edits["method"], edits["n"]) == (
        "edits",
        "world:small",
        "ultraedit",
        2,
    )
    assert {"keys", "solve", "apply", "sync"} <= set(edits["phases"]) and edits["rate"] > 0
    assert (probes["section"], probes["backend"], probes["status"], probes["n"]) == ("probes", "hf", "ok", 40)
