"""Analysis over the quickstart's database: comparison table, report plots + HTML, exports and the
forgetting-study notebook executed headless. (The views' rows are checked by hand in test_storage.)"""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.storage.logger import read_only_query

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart_db(tmp_path_factory, ray_session):
    """``scenarios/quickstart.yaml`` as `make run` runs it (200 edits, 2 shards), into a fresh file."""
    db = tmp_path_factory.mktemp("quickstart") / "lme.duckdb"
    r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios" / "quickstart.yaml"), "--db", str(db)])
    assert r.exit_code == 0, r.output
    run_id = read_only_query(db, "select run_id from runs")[1][0][0]
    return db, run_id


def test_compare_prints_the_papers_columns(quickstart_db):
    db, run_id = quickstart_db
    r = CliRunner().invoke(main, ["compare", run_id, "--db", str(db)])
    assert r.exit_code == 0, r.output
    for col in ("efficacy", "generalization", "specificity", "fluency", "consistency", "retention"):
        assert col in r.output
    eff = read_only_query(db, f"select efficacy from method_summary where run_id = '{run_id}'")[1][0][0]
    assert f"{eff:.3f}" in r.output
    ga = read_only_query(
        db, "select batch_id, name, value from metrics where name like 'general_ability%' order by batch_id"
    )[1]
    assert {n for _, n, _ in ga} == {"general_ability", "general_ability_retention"}
    assert len({s for s, _, _ in ga}) >= 4  # measured at every evaluation of the run
    acc, kept = read_only_query(db, "select general_ability, general_ability_retention from method_summary")[
        1
    ][0]
    assert 0.5 <= acc <= 1 and 0 < kept <= 1.5 and "general_ability" in r.output
    r = CliRunner().invoke(main, ["compare", "no-such-run", "--db", str(db)])
    assert r.exit_code == 2 and "no run no-such-run" in r.output


def test_report_writes_plots_of_the_run_and_one_html_page(quickstart_db, tmp_path):
    db, run_id = quickstart_db
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["report", run_id, "--db", str(db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {
        "efficacy_vs_edits.png",
        "forgetting.png",
        "metrics.png",
        "condition.png",
        "layer_usage.png",
    }
    assert all((out / p).stat().st_size > 10_000 for p in pngs)  # real plots, not empty canvases
    page = (out / "index.html").read_text()
    assert run_id in page and page.count("data:image/png;base64,") == 5 and "efficacy" in page


def test_report_plots_carry_the_runs_data(quickstart_db):
    """The curves drawn are the view's rows (checked on the axes, not on the pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lme_sim.report import plot_condition, plot_forgetting

    db, run_id = quickstart_db
    fig, (a, b) = plt.subplots(1, 2)
    plot_forgetting(db, [run_id], str, a)
    plot_condition(db, [run_id], str, b)
    ages, retention = a.lines[0].get_data()
    rows = read_only_query(
        db,
        f"select age, sum(retention * n_probes) / sum(n_probes) from forgetting_curve "
        f"where run_id = '{run_id}' group by age order by age",
    )[1]
    assert list(ages) == [r[0] for r in rows] and list(retention) == pytest.approx([r[1] for r in rows])
    assert a.get_xlabel() and a.get_ylabel() and a.get_title()
    assert len(b.lines) == 2 and b.get_yscale() == "log"  # the quickstart's two edited matrices
    plt.close(fig)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_writes_every_table_of_the_run(quickstart_db, tmp_path, fmt):
    import duckdb

    db, run_id = quickstart_db
    r = CliRunner().invoke(main, ["export", run_id, "--db", str(db), "--format", fmt, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    reader = "read_parquet" if fmt == "parquet" else "read_csv_auto"
    con = duckdb.connect()
    for table in ("runs", "batches", "edits", "probes", "metrics", "weight_stats"):
        n = con.execute(f"select count(*) from {reader}('{tmp_path / (table + '.' + fmt)}')").fetchone()[0]
        expect = read_only_query(db, f"select count(*) from {table} where run_id = '{run_id}'")[1][0][0]
        assert n == expect and n > 0, table


def test_forgetting_notebook_runs_headless(quickstart_db):
    import nbformat
    from nbclient import NotebookClient

    db, run_id = quickstart_db
    nb = nbformat.read(ROOT / "notebooks" / "forgetting_study.ipynb", as_version=4)
    os.environ["LME_SIM_DB"] = str(db)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
    finally:
        del os.environ["LME_SIM_DB"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert run_id in text and "stopped holding" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
