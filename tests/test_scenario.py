"""Bad scenarios stop at validation: one message naming the file and the field, exit code 2,
nothing written."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.preflight import load_checked as load_scenario
from lme_sim.scenario import ScenarioError

GOOD = "name: x\nmodel: world:small\n"
CASES = {
    "malformed YAML": ("name: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- a\n- b\n", "mapping"),
    "unknown field": (GOOD + "colour: blue\n", "colour"),
    "unknown method": (GOOD + "editor: {method: rome9}\n", "editor.method"),
    "misspelt method": (GOOD + "editor: {method: alphedit}\n", "'alphedit' (did you mean 'alphaedit'"),
    "unknown hparam": (GOOD + "editor: {method: memit, hparams: {L2: 1}}\n", "editor.hparams.L2"),
    "ill-typed hparam": (GOOD + "editor: {method: alphaedit, hparams: {L2: lots}}\n", "editor.hparams.L2"),
    "unknown world": ("name: x\nmodel: world:nope\n", "model"),
    "unknown model": ("name: x\nmodel: ./no/such/model\ndata: {kind: counterfact, path: x.json}\n", "model"),
    "missing data file": (
        "name: x\nmodel: smollm2-135m\ndata: {kind: counterfact, path: ./nope/cf.json}\n",
        "data.path",
    ),
    "data without path": ("name: x\nmodel: smollm2-135m\ndata: {kind: zsre}\n", "data.path"),
    "impossible shards": (GOOD + "runtime: {shards: 9}\n", "runtime.shards"),
    "cuts for other shards": (GOOD + "runtime: {shards: 2, cuts: [1, 2]}\n", "runtime.cuts"),
    "cuts not increasing": (GOOD + "runtime: {shards: 3, cuts: [2, 2]}\n", "runtime.cuts"),
    "cut past the last block": (GOOD + "runtime: {shards: 2, cuts: [4]}\n", "runtime.cuts"),  # 4 blocks
    "cut at block 0": (GOOD + "runtime: {shards: 2, cuts: [0]}\n", "runtime.cuts"),
    "zero batch": (GOOD + "stream: {batch_size: 0}\n", "stream.batch_size"),
    "bad timeline": (GOOD + "stream: {timeline: {pattern: poisson, rate: -1}}\n", "stream.timeline"),
    "bad duration": (GOOD + "stream: {timeline: {pattern: fixed, interval: soon}}\n", "stream.timeline"),
    "missing name": ("model: world:small\n", "name"),
    "bad method in a list": (GOOD + "editor: [{method: mose}, {method: rome9}]\n", "editor.1.method"),
    "bad hparam in a list": (GOOD + "editor: [{method: mose, hparams: {lr: fast}}]\n", "editor.0.hparams.lr"),
    "empty method list": (GOOD + "editor: []\n", "editor"),
    "one editor twice": (
        GOOD + "editor: [{method: mose, batch_size: 1}, {method: mose, batch_size: 1}]\n",
        "editor",
    ),
    "zero editor batch": (GOOD + "editor: [{method: mose, batch_size: 0}]\n", "editor.0.batch_size"),
    "bad method in a grid": (GOOD + "editor: {grid: {method: [mose, rome9]}}\n", "editor.grid.method"),
    "bad hparam in a grid set": (
        GOOD + "editor: [{method: ft}, {grid: {method: [mose], overrides: {a: {}, b: {lr: fast}}}}]\n",
        "editor.1.grid.overrides.b.lr",
    ),
    "bad common hparam of a grid": (
        GOOD + "editor: {grid: {method: [mose]}, hparams: {lr: fast}}\n",
        "editor.hparams.lr",
    ),
    "empty grid axis": (
        GOOD + "editor: {grid: {method: [mose], batch_size: []}}\n",
        "editor.grid.batch_size",
    ),
    "a grid point twice": (GOOD + "editor: [{method: mose}, {grid: {method: [mose]}}]\n", "editor"),
    "missing stats corpus": (
        GOOD + "editor: {method: alphaedit, hparams: {stats: {kind: file, path: ./no/corpus.txt}}}\n",
        "editor.hparams.stats.path",
    ),
}


@pytest.mark.parametrize("label", list(CASES))
def test_bad_scenario_is_one_clear_error(tmp_path, label):
    text, field = CASES[label]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(path) in str(err.value) and field in str(err.value)
    db = tmp_path / "out.duckdb"
    r = CliRunner().invoke(main, ["run", str(path), "--db", str(db)])
    assert r.exit_code == 2 and field in r.output and "Traceback" not in r.output
    assert not db.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_scenario_file(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


ROOT = Path(__file__).resolve().parents[1]


def _shipped_scenarios():
    """Every scenarios/*.yaml, those that cannot validate here marked skipped with the reason; one
    failing entry if the glob finds none (a moved folder must not pass as "all valid")."""
    paths = sorted(ROOT.glob("scenarios/*.yaml"))
    if not paths:
        return [pytest.param(None, id="no-scenarios")]
    shared = ROOT.parent / "shared" / "data"
    params = []
    for path in paths:
        text = path.read_text()
        reason = None
        if "meta-llama/" in text:
            reason = "its model is a Hugging Face hub id (gated Llama 3): validation looks it up on the hub"
        elif "../shared/data/" in text and not shared.is_dir():
            reason = f"its data file is in {shared}, not present here"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


@pytest.mark.parametrize("path", _shipped_scenarios())
def test_shipped_scenarios_validate(path, monkeypatch):
    assert path is not None, f"no scenario files found under {ROOT / 'scenarios'}"
    monkeypatch.chdir(ROOT)  # data paths in shipped scenarios are relative to the checkout
    for corpus in re.findall(r"runs/corpus/[\w.-]+\.txt", path.read_text()):
        if not Path(corpus).is_file():  # made as the scenario's header says (runs/ is git-ignored)
            source = "../shared/data/counterfact-train.json"
            r = CliRunner().invoke(main, ["corpus", "--from", source, "--out", corpus])
            assert r.exit_code == 0, r.output
    load_scenario(path)


def test_a_vllm_evaluator_without_vllm_stops_at_validation(tmp_path):
    from lme_sim.vllm_scorer import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    path = tmp_path / "v.yaml"
    path.write_text(GOOD + "evaluator: {backend: vllm, tensor_parallel_size: 2, dtype: bfloat16}\n")
    db = tmp_path / "out.duckdb"
    r = CliRunner().invoke(main, ["run", str(path), "--db", str(db)])
    assert r.exit_code == 2 and "evaluator.backend" in r.output and "vllm is not installed" in r.output
    assert not db.exists()
    ok = tmp_path / "hf.yaml"
    ok.write_text(GOOD + "evaluator: {backend: hf}\n")
    assert load_scenario(ok).evaluator.backend == "hf"


def test_an_editor_with_its_own_batch_size_keeps_the_scenarios_events():
    """An editor's batch_size (its protocol) changes how the events are batched, not the events: the
    same fixed timeline (so the same edits, times and evaluation points) and checkpoints at the same
    edit counts."""
    from lme_sim.scenario import EditorSpec, Scenario

    scn = Scenario(name="x", model="world:small", stream={"batch_size": 100}, eval={"every": 2})
    one = scn.with_editor(EditorSpec(method="mose", batch_size=1))
    assert one.timeline() == scn.timeline() and one.timeline().eval_every == 200
    assert one.stream.batch_size == 1 and one.editors[0].label() == "mose-b1"
    assert one.checkpoint_every() * 1 == scn.checkpoint_every() * 100
    assert EditorSpec(method="alphaedit", name="alphaedit-nas").label() == "alphaedit-nas"
    same = scn.with_editor(EditorSpec(method="mose"))
    assert same.stream == scn.stream and same.editors[0].label() == "mose"


def test_a_grid_stands_for_its_points(tmp_path):
    """methods x batch sizes x named override sets, each point a named editor (its run id's tag, what
    --methods and --resume name), the sets merged over the grid's common hparams; with seeds, one run
    per point and seed."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        GOOD
        + "editor:\n"
        + "  - {method: ft}\n"
        + "  - grid:\n"
        + "      method: [memit, alphaedit]\n"
        + "      batch_size: [1, 10]\n"
        + "      overrides: {plain: {}, anchored: {norm_anchor: {n_samples: 8}}, wide: {layers: [1, 2]}}\n"
        + "    hparams: {layers: [1], norm_anchor: null}\n"
        + "seeds: [0, 1]\n"
    )
    scn = load_scenario(path)
    labels = [e.label() for e in scn.editors]
    assert len(labels) == 1 + 2 * 2 * 3 and labels[:3] == ["ft", "memit-b1-plain", "memit-b1-anchored"]
    assert labels[-1] == "alphaedit-b10-wide"
    by = {e.label(): e for e in scn.editors}
    assert by["memit-b10-plain"].batch_size == 10 and by["memit-b10-plain"].hparams == {
        "layers": [1],
        "norm_anchor": None,
    }
    assert by["alphaedit-b1-anchored"].hparams == {"layers": [1], "norm_anchor": {"n_samples": 8}}
    assert by["alphaedit-b1-wide"].hparams["layers"] == [1, 2]
    r = CliRunner().invoke(main, ["validate", str(path), "--methods", "memit-b1-anchored,ft"])
    assert r.exit_code == 0, r.output
    from lme_sim.cli import _study_runs_or_exit

    runs = _study_runs_or_exit(scn, scn.editors, str(path), str(tmp_path / "x.duckdb"), None)
    assert len(runs) == 13 * 2 and len({r.run_id for r in runs}) == 26
    assert (
        runs[2].run_id.startswith("x-memit-b1-plain-s0-") and runs[2].scn.editor.label() == "memit-b1-plain"
    )
    assert runs[2].scn.stream.batch_size == 1 and runs[2].scn.data.seed == 0
