"""Efficacy over the whole history: the ``efficacy_curve`` and ``collapse`` views, collapse_points at
other thresholds, the compare table's collapse rows and the report's efficacy-vs-edits plot, on a
database written by hand (no Ray run)."""

import pytest
from click.testing import CliRunner

from lme_sim.analysis import collapse_points, summary_rows
from lme_sim.cli import main
from lme_sim.storage.logger import RunLogger, read_only_query

# run id -> efficacy at evaluations after batches 1, 3, 5 (batches of 100 edits, batch 0 has 50)
CURVES = {
    "a-alphaedit": [0.9, 0.6, 0.4],
    "b-mose": [0.95, 0.9, 0.85],
    "c'; drop table runs; --": [0.3, 0.7, 0.2],
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("collapse") / "lme.duckdb"
    with RunLogger(path) as log:
        for k, (rid, curve) in enumerate(CURVES.items()):
            log.start_run(
                rid,
                {
                    "name": "study",
                    "model": "world:small",
                    "editor": {"method": ["alphaedit", "mose", "memit"][k]},
                },
            )
            for b in range(6):
                log.commit_batch(rid, {"batch_id": b, "n_edits": 50 if b == 0 else 100}, {})
            for e, (b, eff) in enumerate(zip((1, 3, 5), curve)):
                n = 50 + 100 * b if rid == "a-alphaedit" else None
                rows = [
                    {"eval_id": e + 1, "batch_id": b, "name": "efficacy", "value": eff, "n": n},
                    {"eval_id": e + 1, "batch_id": b, "name": "generalization", "value": eff / 2},
                ]
                log.append("metrics", [{"run_id": rid, **r} for r in rows])
            log.finish_run(rid)
    return path


def test_efficacy_curve_and_collapse_view(db):
    rows = read_only_query(
        db,
        "select run_id, batch_id, n_edits, efficacy, efficacy_n from efficacy_curve "
        "where run_id = ? order by batch_id",
        ["a-alphaedit"],
    )[1]
    assert rows == [
        ("a-alphaedit", 1, 150, 0.9, 150.0),
        ("a-alphaedit", 3, 350, 0.6, 350.0),
        ("a-alphaedit", 5, 550, 0.4, 550.0),
    ]
    got = dict(
        (r[0], r[1:])
        for r in read_only_query(
            db, "select run_id, threshold, collapse_batch, collapse_edits from collapse"
        )[1]
    )
    assert got == {
        "a-alphaedit": (0.5, 5, 550),
        "b-mose": (0.5, None, None),
        "c'; drop table runs; --": (0.5, 1, 150),
    }
    rows = summary_rows(db, list(CURVES))  # a quote in a run id is a value, never SQL
    assert [(r["collapse_batch"], r["collapse_edits"]) for r in rows] == [(5, 550), (None, None), (1, 150)]
    assert [r["efficacy"] for r in rows] == [0.4, 0.85, 0.2]


def test_collapse_points_at_other_thresholds(db):
    ids = list(CURVES)
    assert collapse_points(db, ids) == [
        {"run_id": i, "method": m, "threshold": 0.5, "collapse_batch": s, "collapse_edits": n}
        for i, m, s, n in zip(ids, ["alphaedit", "mose", "memit"], [5, None, 1], [550, None, 150])
    ]
    at = {p["run_id"]: (p["collapse_batch"], p["collapse_edits"]) for p in collapse_points(db, ids, 0.92)}
    assert at == {"a-alphaedit": (1, 150), "b-mose": (3, 350), "c'; drop table runs; --": (1, 150)}
    assert [p["collapse_batch"] for p in collapse_points(db, ids[1:], 0.1)] == [None, None]


def test_compare_shows_the_collapse_point(db):
    r = CliRunner().invoke(main, ["compare", "a-alphaedit", "b-mose", "--db", str(db)])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if "collapse edits" in l)
    assert "550" in line and "none" in line


def test_report_plots_efficacy_against_edits(db, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lme_sim.report import plot_efficacy_vs_edits, write_report

    fig, ax = plt.subplots()
    plot_efficacy_vs_edits(db, ["a-alphaedit", "b-mose"], str, ax)
    lines = [l for l in ax.lines if l.get_label() and not l.get_label().startswith("_")]
    x, y = lines[0].get_data()
    assert list(x) == [150, 350, 550] and list(y) == [0.9, 0.6, 0.4]
    assert lines[0].get_label() == "a-alphaedit, n = 150-550" and lines[1].get_label() == "b-mose"
    marks = [l for l in ax.lines if l.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_data()[0]) == [550]  # only alphaedit collapsed
    plt.close(fig)
    files = write_report(db, list(CURVES), tmp_path)
    assert tmp_path / "efficacy_vs_edits.png" in files
    page = (tmp_path / "index.html").read_text()
    assert "efficacy vs edits" in page and page.count("data:image/png;base64,") == 5
