"""General ability: multiple-choice probes scored by log-likelihood (lme_sim.general_ability)."""

import json

import pytest
import torch

from lme_sim.arch import weight_view
from lme_sim.general_ability import (
    BUILTIN_ITEMS,
    MCItem,
    ProbeSetError,
    load_items,
    mc_accuracy,
    mc_predictions,
    probe_items,
    world_items,
)
from lme_sim.scoring import score_targets


def test_world_items_skip_edited_facts_and_hold_the_true_object(small_world):
    _, _, world = small_world
    edited = {(f.subject, f.relation) for f in world.facts[:100]}
    items = world_items(world, edited, 50, seed=1)
    assert len(items) == 50 and len({it.question for it in items}) == 50
    by_prompt = {world.prompt(f): f for f in world.facts}
    for it in items:
        f = by_prompt[it.question]
        assert (f.subject, f.relation) not in edited
        assert it.choices[it.answer] == f.obj and len(set(it.choices)) == 4
        assert set(it.choices) <= set(world.objects[f.relation])


def test_predictions_are_the_best_choice_scored_one_at_a_time(small_world):
    model, tok, world = small_world
    items = world_items(world, set(), 12, seed=2)
    preds = mc_predictions(model, tok, items, batch_size=7)
    for it, p in zip(items, preds.tolist()):
        lp = [score_targets(model, tok, [it.question], [c]).mean_logprob[0].item() for c in it.choices]
        assert p == max(range(len(lp)), key=lp.__getitem__)


def test_accuracy_is_high_on_known_facts_and_drops_when_the_model_is_damaged(fresh_small_world):
    model, tok, world = fresh_small_world
    items = world_items(world, set(), 80, seed=0)
    before = mc_accuracy(model, tok, items)
    assert before >= 0.9  # the world model knows its facts
    wrong = [MCItem(it.question, it.choices, (it.answer + 1) % 4) for it in items]
    assert mc_accuracy(model, tok, wrong) <= 0.1
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(model.config.n_layer):
            W = weight_view(model, layer)
            W.add_(torch.randn(W.shape, generator=gen) * W.std() * 10)  # 3x leaves it intact
    after = mc_accuracy(model, tok, items)
    print(f"general ability {before:.3f} -> {after:.3f} after damaging every MLP output matrix")
    assert after < before - 0.3


def test_load_items_reads_jsonl_and_json_and_names_bad_records(tmp_path):
    rows = [
        {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1},
        {"question": "Sky is", "choices": ["blue", "green", "red"], "answer": "blue"},
    ]
    jl = tmp_path / "mc.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    js = tmp_path / "mc.json"
    js.write_text(json.dumps(rows))
    assert (
        load_items(jl)
        == load_items(js)
        == [MCItem("2 + 2 =", ("3", "4"), 1), MCItem("Sky is", ("blue", "green", "red"), 0)]
    )
    bad = tmp_path / "bad.jsonl"
    for record, message in [
        ({"question": "q", "choices": ["a"], "answer": 0}, "record 0: needs at least 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is not one"),
        ({"question": "q", "choices": ["a", "b"], "answer": 5}, "answer must be"),
        ({"choices": ["a", "b"], "answer": 0}, "needs 'question'"),
    ]:
        bad.write_text(json.dumps(record))
        with pytest.raises(ProbeSetError, match=message) as e:
            load_items(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(ProbeSetError, match="not found"):
        load_items(tmp_path / "missing.jsonl")


def test_probe_items_sources(small_world, tmp_path):
    world = small_world[2]
    assert probe_items(10, None) == probe_items(10, None)  # a seeded sample
    assert len(probe_items(10, None)) == 10 and set(probe_items(10, None)) <= set(BUILTIN_ITEMS)
    assert len(probe_items(1000, None)) == len(BUILTIN_ITEMS)
    assert all(it.question in {world.prompt(f) for f in world.facts} for it in probe_items(5, None, world))
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}))
    assert probe_items(5, str(f), world) == [MCItem("q", ("a", "b"), 0)]  # a file wins over the world


def test_builtin_items_are_well_formed():
    assert len(BUILTIN_ITEMS) >= 40
    for it in BUILTIN_ITEMS:
        assert 0 <= it.answer < len(it.choices) and len(set(it.choices)) == len(it.choices)
    assert len({it.question for it in BUILTIN_ITEMS}) == len(BUILTIN_ITEMS)


def test_scenario_names_a_bad_probe_file(tmp_path):
    from lme_sim.preflight import load_checked as load_scenario
    from lme_sim.scenario import ScenarioError

    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}')
    scn = tmp_path / "s.yaml"
    scn.write_text(f"name: x\nmodel: world:small\neval: {{general_ability: {{path: {bad}}}}}\n")
    with pytest.raises(ScenarioError, match=r"s.yaml: field 'eval.general_ability.path': .*record 0"):
        load_scenario(scn)
    scn.write_text("name: x\nmodel: world:small\neval: {general_ability: {n: -1}}\n")
    with pytest.raises(ScenarioError, match="eval.general_ability.n"):
        load_scenario(scn)


@pytest.mark.slow
def test_smollm2_answers_most_builtin_items():
    from lme_sim.models import load_model

    lm = load_model("smollm2-135m", progress=False)
    acc = mc_accuracy(lm.model, lm.tok, list(BUILTIN_ITEMS), batch_size=32)
    print(f"SmolLM2-135M built-in general-ability accuracy: {acc:.3f} on {len(BUILTIN_ITEMS)} items")
    assert acc >= 0.6  # chance is ~0.27
