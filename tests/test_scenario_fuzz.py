"""Property-based tests over scenario files: whatever the text, ``load_scenario`` returns a scenario
or raises one ScenarioError naming the file, and ``lme-sim validate`` prints one ``error:`` line
(exit code 2), never a traceback. Inputs: arbitrary text, arbitrary YAML documents, and a valid
scenario with one field replaced, removed, nested wrongly or joined by an unknown field."""

import tempfile
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lme_sim.cli import main
from lme_sim.preflight import load_checked as load_scenario
from lme_sim.scenario import Scenario, ScenarioError

VALID = {
    "name": "fuzz",
    "model": "world:small",
    "data": {"kind": "world", "n_edits": 20, "seed": 1},
    "editor": {"method": "alphaedit", "hparams": {"layers": [1, 2], "L2": 0.1}, "max_delta_norm": 50.0},
    "stream": {
        "batch_size": 10,
        "speedup": 1000.0,
        "start": "2024-01-01",
        "timeline": {"pattern": "fixed", "n_batches": 2, "batch_size": 10, "interval": "1d"},
    },
    "eval": {"every": 1, "retention_sample": 50, "fluency_prompts": 0, "rows_per_pass": 16},
    "evaluator": {"backend": "hf"},
    "runtime": {"shards": 2, "evaluators": 1, "gpus": False},
    "output_dir": "runs",
    "db": "runs/fuzz.duckdb",
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 3)
    | st.floats()
    | st.dates()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "1d",
            "-1d",
            "6h",
            "99999999999d",
            "2024-13-01",
            "world:nope",
            "fixed",
            "poisson",
            "history",
            "memit",
            "ft",
            "vllm",
            "/etc",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
    ),
    max_leaves=6,
)
# model names that look like hub ids would be looked up on the hub (slow without a network): local ones only
models = st.text(max_size=10).map(lambda s: "./" + s) | st.sampled_from(
    ["world:nope", "world:", "", "x y", "/"]
)


def _paths(doc, prefix=()):
    """Every key path of a nested mapping (where a mutation can land)."""
    for k, v in doc.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(VALID))


@st.composite
def mutated(draw):
    """A deep copy of VALID with one change at one key path."""
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    path = draw(st.sampled_from(PATHS))
    *parents, key = path
    node = doc
    for p in parents:
        node = node[p]
    op = draw(st.sampled_from(["replace", "remove", "unknown", "wrap"]))
    if op == "replace":
        node[key] = draw(models if path == ("model",) else values)
    elif op == "remove":
        del node[key]
    elif op == "unknown":
        target = node[key] if isinstance(node[key], dict) else node
        target[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in target))] = draw(values)
    else:
        node[key] = [node[key]]
    return yaml.safe_dump(doc, allow_unicode=True)


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scn.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            scn = load_scenario(path)
        except ScenarioError as e:
            msg = str(e)
            assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
            ok = False
        else:
            assert isinstance(scn, Scenario)
            scn.timeline()  # what the run derives first must work for an accepted scenario
            ok = True
        r = CliRunner().invoke(main, ["validate", str(path)])
        assert (r.exception is None or isinstance(r.exception, SystemExit)) and "Traceback" not in r.output, (
            r.output,
            r.exception,
        )
        if ok:
            assert r.exit_code == 0, r.output
        else:
            errors = [line for line in r.output.splitlines() if line.startswith("error:")]
            assert r.exit_code == 2 and len(errors) == 1 and r.output == errors[0] + "\n", r.output
            assert str(path) in errors[0]


FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=200))
def test_any_text(text):
    _check(text)


@FUZZ
@given(values)
def test_any_yaml_document(doc):
    _check(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(mutated())
def test_a_valid_scenario_with_one_field_broken(text):
    _check(text)


def test_the_valid_base_is_valid(tmp_path):
    """Guards the fuzzing above: its starting point passes validation."""
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_scenario(path).editor.max_delta_norm == 50.0
