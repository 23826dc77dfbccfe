"""Seeds and spread: ``seeds: [...]`` runs one run per seed (the seed draws the stream), ``compare``
shows mean ± std and n per method (and protocol), ``report`` draws bands. The table and plot on a
database written by hand; one real run of two seeds on world:small."""

import json
import statistics

import pytest
from click.testing import CliRunner

from lme_sim.analysis import mean_std, run_groups
from lme_sim.cli import main
from lme_sim.report import band, plot_efficacy_vs_edits
from lme_sim.runtime.coordinator import scenario_cases
from lme_sim.scenario import ScenarioError, load_scenario
from lme_sim.storage.logger import RunLogger, read_only_query

from .test_data import FLAT

# run id -> (method, protocol: edits per batch, seed, efficacy at the evaluations after batches 0, 1, 2)
RUNS = {
    "s-ultraedit-s0": ("ultraedit", None, 0, [0.9, 0.8, 0.7]),
    "s-ultraedit-s1": ("ultraedit", None, 1, [1.0, 0.6, 0.5]),
    "s-ultraedit-s2": ("ultraedit", None, 2, [0.8, 0.7, 0.3]),
    "s-memit-seq-s0": ("memit", 1, 0, [0.9, 0.4, 0.2]),
    "s-memit-seq-s1": ("memit", 1, 1, [0.7, 0.6, 0.4]),
    "s-memit-batch": ("memit", 100, 0, [0.5, 0.5, 0.5]),
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeds") / "lme.duckdb"
    with RunLogger(path) as log:
        for rid, (method, protocol, seed, curve) in RUNS.items():
            config = {"data": {"seed": seed}, "seeds": [0, 1, 2], "editor": {"method": method}}
            if protocol:
                config["stream"] = {"batch_size": protocol}
            log.start_run(rid, {**config, "name": "s", "model": "world:small"})
            for b in range(3):
                log.commit_batch(rid, {"batch_id": b, "n_edits": 10}, {})
            for e, eff in enumerate(curve):
                log.append(
                    "metrics",
                    [
                        {
                            "run_id": rid,
                            "eval_id": e + 1,
                            "batch_id": e,
                            "name": "efficacy",
                            "value": eff,
                            "n": 10,
                        },
                        {
                            "run_id": rid,
                            "eval_id": e + 1,
                            "batch_id": e,
                            "name": "retention",
                            "value": eff / 2,
                        },
                    ],
                )
            log.finish_run(rid)
    return path


def test_mean_std_and_band():
    assert mean_std([1.0, None, 3.0]) == (2.0, statistics.stdev([1.0, 3.0]), 2)
    assert mean_std([0.5]) == (0.5, 0.0, 1) and mean_std([None]) is None
    curves = [[(10, 0.9), (20, 0.8)], [(10, 1.0), (20, 0.6)], [(10, 0.8)]]
    got = band(curves)
    assert [(x, n) for x, _, _, n in got] == [(10, 3), (20, 2)]
    assert got[0][1:3] == pytest.approx((0.9, statistics.stdev([0.9, 1.0, 0.8])))
    assert got[1][1:3] == pytest.approx((0.7, statistics.stdev([0.8, 0.6])))


def test_runs_group_by_method_and_protocol(db):
    groups = run_groups(db, list(RUNS))
    assert [(g["label"], [r["seed"] for r in g["runs"]]) for g in groups] == [
        ("ultraedit", [0, 1, 2]),
        ("memit (batch 1)", [0, 1]),
        ("memit (batch 100)", [0]),
    ]
    _, rows = read_only_query(  # the seed is in the run's config, for SQL
        db,
        "select scenario->>'$.data.seed' as seed, count(*) from runs where method = 'ultraedit' "
        "group by seed order by seed",
    )
    assert rows == [("0", 1), ("1", 1), ("2", 1)]


def test_compare_shows_mean_std_and_n_per_method(db, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps cells at the terminal's width
    r = CliRunner().invoke(main, ["compare", *RUNS, "--db", str(db)])
    assert r.exit_code == 0, r.output
    assert "mean ± std over runs" in r.output
    assert "ultraedit" in r.output and "n = 3" in r.output and "memit (batch 1)" in r.output
    final = {rid: curve[-1] for rid, (*_, curve) in RUNS.items()}
    ultra = [final[f"s-ultraedit-s{s}"] for s in range(3)]
    seq = [final["s-memit-seq-s0"], final["s-memit-seq-s1"]]
    eff_row = next(line for line in r.output.splitlines() if line.strip("│ ").startswith("efficacy "))
    assert f"{statistics.fmean(ultra):.3f} ± {statistics.stdev(ultra):.3f}" in eff_row
    assert f"{statistics.fmean(seq):.3f} ± {statistics.stdev(seq):.3f}" in eff_row
    assert eff_row.split("│")[-2].strip() == "0.500"  # the single batch-protocol run (n = 1): its value
    collapse = next(line for line in r.output.splitlines() if "collapse batch" in line)
    assert "2 ± 0 (1 of 3)" in collapse  # ultraedit: one run of 3 fell below 0.5, after batch 2
    assert "1.5 ± 0.71 (2 of 2)" in collapse and "none" in collapse  # memit: steps 1 and 2; batch: never
    one = CliRunner().invoke(main, ["compare", "s-ultraedit-s0", "s-memit-batch", "--db", str(db)])
    assert one.exit_code == 0 and "±" not in one.output and "s-ultraedit-s0" in one.output  # one run each


def test_report_draws_a_band_per_method(db, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot_efficacy_vs_edits(db, list(RUNS), str, ax)
    lines = {line.get_label(): line for line in ax.lines}
    mean = lines["ultraedit, mean ± std over 3 runs"]
    curves = [RUNS[f"s-ultraedit-s{s}"][3] for s in range(3)]
    assert list(mean.get_xdata()) == [10, 20, 30]
    assert list(mean.get_ydata()) == pytest.approx([statistics.fmean(c) for c in zip(*curves)])
    assert "memit (batch 1), mean ± std over 2 runs" in lines and "s-memit-batch, n = 10" in lines
    assert len(ax.collections) == 2  # one band per method with several runs
    upper = max(p[1] for p in ax.collections[0].get_paths()[0].vertices if p[0] == 20)
    assert upper == pytest.approx(statistics.fmean([0.8, 0.6, 0.7]) + statistics.stdev([0.8, 0.6, 0.7]))
    plt.close(fig)
    r = CliRunner().invoke(main, ["report", *RUNS, "--db", str(db), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "efficacy_vs_edits.png").stat().st_size > 10_000


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_seeds_draw_the_stream_of_a_file(tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{**FLAT, "case_id": i} for i in range(8)]))
    base = f"name: s\nmodel: smollm2-135m\ndata: {{kind: counterfact, path: {data}, n_edits: 4}}\n"
    plain = load_scenario(_write(tmp_path, base))
    assert [c.case_id for c in scenario_cases(plain, None)] == [
        "0",
        "1",
        "2",
        "3",
    ]  # the file's first, in order
    seeded = load_scenario(_write(tmp_path, base + "seeds: [0, 1]\n"))
    draws = [[c.case_id for c in scenario_cases(seeded.with_seed(s), None)] for s in seeded.seeds]
    assert all(len(d) == len(set(d)) == 4 for d in draws) and draws[0] != draws[1]
    assert draws[0] == [c.case_id for c in scenario_cases(seeded.with_seed(0), None)]  # reproducible
    for seeds, what in (("[]", "seeds"), ("[1, 1]", "repeats a seed")):
        with pytest.raises(ScenarioError, match=what):
            load_scenario(_write(tmp_path, base + f"seeds: {seeds}\n"))


def test_a_seeded_scenario_runs_once_per_seed(tmp_path, ray_session, monkeypatch):
    db = tmp_path / "seeds.duckdb"
    scn = _write(
        tmp_path,
        f"name: sd\nmodel: world:small\ndata: {{kind: world, n_edits: 10}}\nseeds: [3, 4]\n"
        f"editor: {{method: ft}}\nstream: {{batch_size: 5}}\neval: {{every: 2, fluency_prompts: 0}}\n"
        f"db: {db}\n",
    )
    r = CliRunner().invoke(main, ["run", scn])
    assert r.exit_code == 0, r.output
    _, runs = read_only_query(
        db, "select run_id, scenario->>'$.data.seed', status from runs order by scenario->>'$.data.seed'"
    )
    assert [(seed, status) for _, seed, status in runs] == [("3", "finished"), ("4", "finished")]
    assert "-s3-" in runs[0][0] and "-s4-" in runs[1][0]
    _, streams = read_only_query(
        db, "select run_id, list(case_id order by edit_id) from edits group by run_id"
    )
    assert len(streams) == 2 and streams[0][1] != streams[1][1]  # each seed draws its own stream
    monkeypatch.setenv("COLUMNS", "300")
    r = CliRunner().invoke(main, ["compare", runs[0][0], runs[1][0], "--db", str(db)])
    assert r.exit_code == 0 and "n = 2" in r.output and "3, 4" in r.output, r.output


def test_resume_continues_a_run_at_its_own_seed(tmp_path):
    from lme_sim.cli import _resumable_run_or_exit

    db = tmp_path / "r.duckdb"
    with RunLogger(db) as log:
        log.start_run(
            "sd-s4-x",
            {
                "name": "sd",
                "model": "world:small",
                "editor": {"method": "ft"},
                "data": {"seed": 4},
                "seeds": [3, 4],
            },
        )
        log.start_run(
            "old-x", {"name": "sd", "model": "world:small", "editor": {"method": "ft"}}
        )  # a run logged without a seed
    assert _resumable_run_or_exit(str(db), "sd-s4-x", "sd", "sd.yaml", {"ft"}) == ("ft", 4)
    assert _resumable_run_or_exit(str(db), "old-x", "sd", "sd.yaml", {"ft"}) == ("ft", 0)  # the default
