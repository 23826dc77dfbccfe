"""``lme-sim import``: runs from several results databases into one, every row once, or nothing."""

import pytest
from click.testing import CliRunner

from lme_sim.analysis import summary_rows
from lme_sim.cli import main
from lme_sim.storage.importer import RunImportError, import_runs
from lme_sim.storage.logger import RunLogger, read_only_query
from lme_sim.storage.schema import RUN_TABLES


def _study_db(path, runs: dict[str, float]):
    """A database with one finished run per id: 2 batches of 2 edits, a rejected batch, efficacy."""
    with RunLogger(path) as log:
        for rid, eff in runs.items():
            log.start_run(rid, {"name": "study", "model": "world:small", "editor": {"method": "memit"}})
            for b in range(2):
                edits = [
                    {
                        "edit_id": 2 * b + i,
                        "kind": "edit",
                        "case_id": f"c{2 * b + i}",
                        "subject": "s",
                        "prompt": "p",
                        "target_new": "n",
                        "modules": ["m.3", "m.4"],
                        "delta_norms": [0.5, 0.25],
                    }
                    for i in range(2)
                ]
                log.commit_batch(
                    rid, {"batch_id": b, "n_edits": 2, "timings": {"keys": 0.1}}, {"edits": edits}
                )
            log.append(
                "rejected_batches", [{"after_batch": 1, "n_edits": 1, "edit_ids": [4], "reason": "nan"}]
            )
            log.append(
                "metrics", [{"run_id": rid, "eval_id": 1, "batch_id": 1, "name": "efficacy", "value": eff}]
            )
            log.finish_run(rid)
    return path


def _counts(db) -> dict[str, int]:
    return {t: read_only_query(db, f"select count(*) from {t}")[1][0][0] for t in RUN_TABLES}


@pytest.fixture
def sources(tmp_path):
    return [
        _study_db(tmp_path / "a.duckdb", {"run-a1": 0.9, "run-a2": 0.8}),
        _study_db(tmp_path / "b.duckdb", {"run-b": 0.7}),
    ]


def test_runs_of_two_databases_land_in_one_with_every_row(tmp_path, sources):
    target = tmp_path / "study" / "study.duckdb"
    assert import_runs(target, sources) == ["run-a1", "run-a2", "run-b"]
    got, a, b = _counts(target), _counts(sources[0]), _counts(sources[1])
    assert got == {t: a[t] + b[t] for t in RUN_TABLES} and got["edits"] == 12 and got["rejected_batches"] == 3
    # every column as it was: lists, JSON, the run's status, and the views over them
    lists = "select modules, delta_norms from edits where run_id = 'run-b' limit 1"
    assert read_only_query(target, lists)[1] == [(["m.3", "m.4"], [0.5, 0.25])]
    keys = "select timings->>'keys' from batches where run_id = 'run-a2' limit 1"
    assert read_only_query(target, keys)[1] == [("0.1",)]
    assert read_only_query(target, "select distinct status from runs")[1] == [("finished",)]
    assert [r["efficacy"] for r in summary_rows(target, ["run-a1", "run-b"])] == [0.9, 0.7]


def test_nothing_is_duplicated_or_half_written(tmp_path, sources):
    target = tmp_path / "t.duckdb"
    import_runs(target, sources[1:])
    before = _counts(target)
    with pytest.raises(RunImportError, match="already holds run run-b; nothing was imported"):
        import_runs(target, sources)  # run-a1, run-a2 are new, run-b is not: none of them is copied
    assert _counts(target) == before
    twin = _study_db(tmp_path / "twin.duckdb", {"run-a2": 0.1})
    fresh = tmp_path / "fresh.duckdb"
    with pytest.raises(RunImportError, match="run run-a2 is also in"):
        import_runs(fresh, [sources[0], twin])
    assert not fresh.exists()
    with pytest.raises(RunImportError, match="no run run-zz in"):
        import_runs(fresh, sources, ["run-a1", "run-zz"])
    with pytest.raises(RunImportError, match="is the target database itself"):
        import_runs(sources[0], sources)


def test_cli_imports_chosen_runs_and_refuses_bad_input_in_one_line(tmp_path, sources):
    target = tmp_path / "t.duckdb"
    runner = CliRunner()
    out = runner.invoke(
        main, ["import", *map(str, sources), "--db", str(target), "--run", "run-a2", "--run", "run-b"]
    )
    assert out.exit_code == 0, out.output
    assert out.output.split() == ["run-a2", "run-b"]
    assert [r[0] for r in read_only_query(target, "select run_id from runs order by run_id")[1]] == [
        "run-a2",
        "run-b",
    ]
    for bad, what in [
        (tmp_path / "missing.duckdb", "missing.duckdb: no such database"),
        (tmp_path / "notes.txt", "notes.txt: cannot open it as a DuckDB database"),
    ]:
        if bad.suffix == ".txt":
            bad.write_text("not a database\n")
        out = runner.invoke(main, ["import", str(bad), "--db", str(target)])
        assert out.exit_code == 2 and out.output.startswith("error: ") and what in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
    out = runner.invoke(main, ["import", str(sources[1]), "--db", str(target)])
    assert out.exit_code == 2 and "already holds run run-b" in out.output


def test_a_failed_import_into_a_new_file_leaves_no_file(tmp_path, sources, monkeypatch):
    import lme_sim.storage.importer as importer

    def broken(con, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer, "create_schema", broken)
    target = tmp_path / "new.duckdb"
    with pytest.raises(RuntimeError, match="disk full"):
        import_runs(target, sources)
    assert not target.exists() and not target.with_name("new.duckdb.wal").exists()
