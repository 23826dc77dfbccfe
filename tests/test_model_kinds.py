"""The kinds of model name (lme_sim.models): each kind answers what callers used to decide by prefix,
a kind name is registered once, and a name no kind can load is one error line with the closest
registered names."""

import pytest
from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.models import (
    KINDS,
    ModelKind,
    PretrainedKind,
    SmolLM2Kind,
    WorldKind,
    model_kind,
    model_path,
    model_problem,
    register_kind,
    unknown_model,
)
from lme_sim.preflight import load_checked
from lme_sim.scenario import ScenarioError


@pytest.mark.parametrize(
    "name, kind",
    [
        ("world:small", WorldKind),
        ("world:nope", WorldKind),  # claimed by the world kind, which then says the world is unknown
        ("smollm2-135m", SmolLM2Kind),
        ("HuggingFaceTB/SmolLM2-135M", PretrainedKind),
        ("./my/model", PretrainedKind),
    ],
)
def test_each_name_has_one_kind(name, kind):
    assert type(model_kind(name)) is kind


def test_kinds_answer_what_callers_asked_by_prefix():
    world, smol = model_kind("world:small"), model_kind("smollm2-135m")
    assert world.has_world and not smol.has_world and not model_kind("./m").has_world
    assert world.world("world:small").config.name == "small" and smol.world("smollm2-135m") is None
    assert world.n_layers("world:small") == 4 and smol.n_layers("smollm2-135m") == 30
    assert world.hparams_key("world:small") == "world" and smol.hparams_key("smollm2-135m") == "smollm2-135m"
    assert (world.checkpoint_every, smol.checkpoint_every) == (1, 10)
    assert model_path("./my/model") == "./my/model"  # a folder is its own folder


def test_a_world_model_folder_holds_the_trained_model(small_world):
    from pathlib import Path

    assert (Path(model_path("world:small")) / "stats.json").is_file()


def test_a_kind_name_is_registered_once(monkeypatch):
    monkeypatch.setattr("lme_sim.models.KINDS", dict(KINDS))

    class Another(ModelKind):
        kind = "world"

    with pytest.raises(
        ValueError, match=r"model kind 'world' is already registered by lme_sim.models.WorldKind"
    ):
        register_kind(Another)

    class SecondFallback(ModelKind):
        kind = "folders"
        fallback = True

    with pytest.raises(ValueError, match="the fallback model kind is already registered by .*PretrainedKind"):
        register_kind(SecondFallback)
    register_kind(WorldKind)  # the same class again (a re-import): no error


def test_a_registered_kind_claims_its_names(monkeypatch):
    monkeypatch.setattr("lme_sim.models.KINDS", dict(KINDS))

    @register_kind
    class Toy(ModelKind):
        kind = "toy"
        syntax = "toy:<n>"

        def claims(self, name):
            return name.startswith("toy:")

        def names(self):
            return ["toy:1"]

        def n_layers(self, name):
            return 2

    assert type(model_kind("toy:1")) is Toy and model_problem("toy:1") is None
    assert "toy:<n> (toy:1)" in unknown_model("toy1")


def test_unknown_names_suggest_the_closest_registered_one():
    msg = unknown_model("smolm2-135m")
    assert msg.startswith("'smolm2-135m' is not a registered model, a local model folder, or a hub id")
    assert "did you mean 'smollm2-135m'?" in msg
    assert "known: world:<name> (world:default, world:small), smollm2-135m, a from_pretrained folder" in msg
    assert model_problem("world:smal") == (
        "unknown world 'world:smal' (did you mean 'world:small'? known: world:default, world:small)"
    )


@pytest.mark.parametrize(
    "model, message",
    [
        ("world:smal", "field 'model': unknown world 'world:smal' (did you mean 'world:small'?"),
        ("./smollm2-135", "field 'model': './smollm2-135' is not a registered model"),
    ],
)
def test_a_bad_model_in_a_scenario_is_one_error_line(tmp_path, model, message):
    path = tmp_path / "bad.yaml"
    data = "data: {kind: counterfact, path: cf.json}\n" if not model.startswith("world:") else ""
    path.write_text(f"name: x\nmodel: {model}\n{data}")
    with pytest.raises(ScenarioError, match=r"^" + str(path)) as err:
        load_checked(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    if model == "./smollm2-135":
        assert "did you mean 'smollm2-135m'?" in str(err.value)
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 2 and r.output.startswith(f"error: {path}: field 'model': "), r.output
    assert "known: world:" in r.output and len(r.output.strip().splitlines()) == 1
