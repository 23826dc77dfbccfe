"""Named datasets (lme_sim.catalog): ``lme-sim data get/list`` against a local HTTP server, checksums,
failed downloads that leave nothing behind, scenarios that name a dataset, and the key-statistics
corpus built from a named dataset on first use."""

import dataclasses
import functools
import json
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from lme_sim import catalog
from lme_sim.cli import main
from lme_sim.corpus import cached_corpus, corpus_lines
from lme_sim.data import load_counterfact
from lme_sim.editors.covariance import _corpus_key, corpus_texts
from lme_sim.editors.hparams import StatsHParams
from lme_sim.runtime.coordinator import scenario_cases
from lme_sim.scenario import ScenarioError, load_scenario

from .test_data import FLAT


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty data folder, and a cache of its own (for corpus files)."""
    folder = tmp_path / "data"
    monkeypatch.setenv("LME_SIM_DATA", str(folder))
    monkeypatch.setenv("LME_SIM_CACHE", str(tmp_path / "cache"))
    return folder


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr (the CLI's output is checked)
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www (a small flat CounterFact file), shut down
    after the test."""
    www = tmp_path / "www"
    www.mkdir()
    records = [{**FLAT, "case_id": i, "ground_truth": f"Lang{i}"} for i in range(5)]
    (www / "cf.json").write_text(json.dumps(records))
    handler = functools.partial(_Quiet, directory=str(www))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused: no network to reach)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/counterfact.json"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_get_downloads_records_the_checksum_and_lists(data_dir, server):
    base, www = server
    r = CliRunner().invoke(main, ["data", "get", "counterfact", "--url", f"{base}/cf.json"])
    assert r.exit_code == 0, r.output
    path = data_dir / "counterfact.json"
    assert path.read_bytes() == (www / "cf.json").read_bytes()
    assert "downloaded from" in r.output and "sha256 matches the recorded one" in r.output
    digest, size = (data_dir / "counterfact.json.sha256").read_text().split()
    assert digest == catalog.sha256_of(path) and int(size) == path.stat().st_size
    assert _leftovers(data_dir) == ["counterfact.json", "counterfact.json.sha256"]  # no partial file
    r = CliRunner().invoke(main, ["data", "get", "counterfact"])  # here already: checked, not fetched
    assert r.exit_code == 0 and "already here" in r.output, r.output
    r = CliRunner().invoke(main, ["data", "list"])
    row = next(line for line in r.output.splitlines() if line.startswith("counterfact\t"))
    assert "sha256 matches the recorded one" in row and f"{path.stat().st_size:,}" in row
    assert "zsre\tzsre\t\tnot downloaded" in r.output

    path.write_text(path.read_text().replace("Lang3", "Lang9"))  # the file changed after download
    r = CliRunner().invoke(main, ["data", "list"])
    assert "CHANGED" in next(line for line in r.output.splitlines() if line.startswith("counterfact\t"))
    r = CliRunner().invoke(main, ["data", "get", "counterfact"])
    assert r.exit_code == 2 and r.output.startswith("error: lme-sim data get: ") and "recorded" in r.output


def test_published_checksum_mismatch_keeps_nothing(data_dir, server):
    base, _ = server  # counterfact-edit has a published sha256; the server's file is another
    r = CliRunner().invoke(main, ["data", "get", "counterfact-edit", "--url", f"{base}/cf.json"])
    assert r.exit_code == 2 and "invalid hash value" in r.output and f"{base}/cf.json" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert _leftovers(data_dir) == []
    r = CliRunner().invoke(
        main, ["data", "get", "counterfact", "--url", f"{base}/cf.json", "--sha256", "ab" * 32]
    )
    assert r.exit_code == 2 and "invalid hash value" in r.output
    assert _leftovers(data_dir) == []


def test_no_network_is_one_error_line_naming_the_command_and_source(data_dir):
    url = _closed_port_url()
    r = CliRunner().invoke(main, ["data", "get", "zsre", "--url", url])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [r.output.strip()]
    assert r.output.startswith("error: lme-sim data get: cannot download 'zsre' from " + url)
    assert _leftovers(data_dir) == []
    r = CliRunner().invoke(main, ["data", "get", "nope"])
    assert r.exit_code == 2 and "unknown dataset 'nope'" in r.output


def _scenario(tmp_path, data: str, extra: str = "") -> str:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nmodel: world:small\ndata: {data}\n{extra}")
    return str(path)


def test_run_downloads_missing_datasets_or_stops_before_anything(data_dir, tmp_path, monkeypatch):
    ds = catalog.DATASETS["counterfact-edit"]
    monkeypatch.setitem(catalog.DATASETS, ds.name, dataclasses.replace(ds, url=_closed_port_url()))
    db = tmp_path / "runs.duckdb"
    scn = tmp_path / "s.yaml"
    scn.write_text(
        "name: s\nmodel: smollm2-135m\ndata: {kind: counterfact, source: counterfact-edit, n_edits: 4}\n"
        "editor: {method: ultraedit}\n"
    )
    r = CliRunner().invoke(main, ["validate", str(scn)])
    assert r.exit_code == 0 and "datasets not yet in" in r.output and "counterfact-edit" in r.output, r.output
    r = CliRunner().invoke(main, ["run", str(scn), "--db", str(db)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: lme-sim run: cannot download 'counterfact-edit' from http://127.0.0.1")
    assert not db.exists() and _leftovers(data_dir) == []


def test_scenario_names_a_dataset(data_dir, server, tmp_path):
    base, _ = server
    assert CliRunner().invoke(main, ["data", "get", "counterfact", "--url", f"{base}/cf.json"]).exit_code == 0
    scn = load_scenario(_scenario(tmp_path, "{kind: counterfact, source: counterfact, n_edits: 3}"))
    cases = scenario_cases(scn, None)
    assert [c.target_true for c in cases] == ["Lang0", "Lang1", "Lang2"]
    bad = {
        "{kind: zsre, source: counterfact}": "data.source",  # a dataset of another kind
        "{kind: counterfact, source: nope}": "data.source",
        "{kind: counterfact, source: counterfact, path: x.json}": "data.path",  # both
        "{kind: counterfact}": "data.path",  # neither
        "{kind: world, source: counterfact}": "data.source",
    }
    for data, field in bad.items():
        with pytest.raises(ScenarioError, match=f"field '{field}'"):
            load_scenario(_scenario(tmp_path, data))


def test_stats_corpus_from_a_named_dataset_is_built_once_and_keyed_like_its_file(data_dir, server):
    base, _ = server
    with pytest.raises(ValueError, match="lme-sim data get counterfact"):
        cached_corpus("counterfact")  # not downloaded yet: says how to get it
    assert CliRunner().invoke(main, ["data", "get", "counterfact", "--url", f"{base}/cf.json"]).exit_code == 0
    stats = StatsHParams(kind="cases", source="counterfact", n_samples=7)
    texts = corpus_texts(stats)
    expected = corpus_lines(load_counterfact(data_dir / "counterfact.json"))
    assert texts == expected[:7] and len(expected) == 10
    built = cached_corpus("counterfact")
    assert built.read_text().splitlines() == expected
    mtime = built.stat().st_mtime_ns
    corpus_texts(stats)
    assert built.stat().st_mtime_ns == mtime  # cached: not written again
    copy = data_dir.parent / "copy.txt"
    copy.write_text(built.read_text())
    as_file = StatsHParams(kind="file", path=str(copy), n_samples=7)
    assert _corpus_key(stats) == _corpus_key(as_file)  # the same statistics cache as the same text by path
    assert _corpus_key(stats) != _corpus_key(as_file.model_copy(update={"n_samples": 8}))
    with pytest.raises(ValueError, match="not a CounterFact dataset"):
        cached_corpus("zsre")


def test_validate_methods_checks_only_the_chosen_editors(tmp_path):
    scn = _scenario(
        tmp_path,
        "{kind: world, n_edits: 4}",
        "editor:\n  - {method: ultraedit}\n  - method: alphaedit\n"
        "    hparams: {stats: {kind: file, path: ./no/corpus.txt}}\n",
    )
    r = CliRunner().invoke(main, ["validate", scn])
    assert r.exit_code == 2 and "editor.1.hparams.stats.path" in r.output
    r = CliRunner().invoke(main, ["validate", scn, "--methods", "ultraedit"])
    assert r.exit_code == 0 and "ok (ultraedit on world:small" in r.output, r.output
    r = CliRunner().invoke(main, ["validate", scn, "--methods", "rome"])
    assert r.exit_code == 2 and "--methods" in r.output and "no 'rome' editor" in r.output


def test_the_project_copies_are_the_published_files():
    """With LME_SIM_DATA at ../shared/data (tests/conftest.py), the named datasets the study reads are
    this project's copies, and they have the sha256 of the public files the catalog names."""
    for name in ("counterfact-edit", "counterfact-train"):
        if not catalog.local_path(name).is_file():
            pytest.skip(f"{catalog.local_path(name)} not present")
        assert catalog.verify(name) == "sha256 matches the published one"


def test_bench_and_train_editor_take_a_named_dataset(data_dir, server, monkeypatch, tmp_path):
    """``bench --data NAME`` and RLEdit's ``train_source`` download a missing named dataset first, or
    stop with one error line naming the command and the source (no network)."""
    base, _ = server
    edit, train = catalog.DATASETS["counterfact-edit"], catalog.DATASETS["counterfact-train"]
    offline = dataclasses.replace(edit, url=_closed_port_url(), sha256=None)
    monkeypatch.setitem(catalog.DATASETS, edit.name, offline)
    out = tmp_path / "b.json"
    bench = ["bench", "--model", "smollm2-135m", "--data", "counterfact-edit", "--out", str(out)]
    r = CliRunner().invoke(main, bench)
    assert r.exit_code == 2 and r.output.startswith("error: lme-sim bench: cannot download 'counterfact-edit")
    assert not out.exists() and _leftovers(data_dir) == []
    monkeypatch.setitem(catalog.DATASETS, edit.name, dataclasses.replace(offline, url=f"{base}/cf.json"))
    r = CliRunner().invoke(main, bench)  # downloaded, then read as the cases file (too few records here)
    assert r.exit_code == 2 and f"5 CounterFact records in '{catalog.local_path(edit.name)}'" in r.output
    monkeypatch.setitem(catalog.DATASETS, train.name, dataclasses.replace(train, url=_closed_port_url()))
    r = CliRunner().invoke(main, ["train-editor", "--method", "rledit", "--model", "smollm2-135m"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: lme-sim train-editor: cannot download 'counterfact-train'")
