"""Generative metrics (WILD-style): what the edited model generates from the probe prompts, beside the
teacher-forced scores, in the same evaluation call."""

import copy

import pytest

from lme_sim.cases import EditCase
from lme_sim.metrics import (
    begins_with,
    generation_budget,
    generation_metrics,
    generation_probes,
    generation_rows,
)
from lme_sim.models import LoadedModel
from lme_sim.runtime.services import EvalRequest, Evaluator
from lme_sim.scoring import greedy_generate


@pytest.mark.parametrize(
    "text, target, hit",
    [
        (" Paris is the capital", "Paris", True),
        ("  PARIS.", "paris", True),
        ("Paris", "Paris", True),
        (" Parisian food", "Paris", False),  # not at a word boundary
        (" the city of Paris", "Paris", False),  # must begin with it
        (" New  York City", "new york", True),  # whitespace runs and case normalized
        ("", "Paris", False),
        (" anything", "", False),
    ],
)
def test_begins_with_normalizes_whitespace_and_case_at_a_word_boundary(text, target, hit):
    assert begins_with(text, target) is hit


def test_generation_rows_average_paraphrases_and_neighbors():
    case = EditCase(
        case_id="c",
        subject="p",
        prompt="p",
        target_new="new",
        target_true="old",
        paraphrases=("p1", "p2"),
        neighborhood=(("n1", "a"), ("n2", "b"), ("n3", "c")),
    )
    prompts, expected, index = generation_probes([case])
    assert prompts == ["p", "p1", "p2", "n1", "n2", "n3"]
    assert expected == ["new", "new", "new", "a", "b", "c"]
    row = generation_rows([case], index, [True, True, False, False, True, True])[0]
    assert row == {"case_id": "c", "gen_efficacy": 1.0, "gen_generalization": 0.5, "gen_specificity": 2 / 3}


def test_an_edit_flips_what_the_model_generates(small_world):
    """Before AlphaEdit the world model generates the true objects; after it, the new ones, while the
    neighborhood continuations keep their true objects."""
    from lme_sim.editors import make_editor

    model, tok, world = small_world
    model = copy.deepcopy(model)
    cases = world.edit_cases(10, seed=1)
    before = {r["case_id"]: r for r in generation_metrics(model, tok, cases)[0]}
    assert sum(r["gen_efficacy"] for r in before.values()) == 0  # nobody generates the new object yet
    texts = greedy_generate(model, tok, [c.prompt for c in cases], 4)
    assert sum(begins_with(t, c.target_true) for t, c in zip(texts, cases)) >= 8  # it knows the facts

    make_editor("alphaedit", LoadedModel("world:small", model, tok, world), progress=False).edit(cases)
    after, texts, index = generation_metrics(model, tok, cases)
    assert sum(r["gen_efficacy"] for r in after) >= 8
    assert sum(r["gen_specificity"] for r in after) / len(after) >= 0.7
    rewrite = [t for t, (_, kind, _) in zip(texts, index) if kind == "rw"]
    assert sum(begins_with(t, c.target_new) for t, c in zip(rewrite, cases)) >= 8


def test_the_evaluator_reports_generative_beside_teacher_forced_metrics(small_world):
    """One evaluation gives both kinds; the generative ones equal the reference (uncached) generation
    path, and ``generative=False`` leaves them out."""
    ev = Evaluator("world:small")
    cases = small_world[2].edit_cases(6, seed=2)
    out = ev.evaluate(EvalRequest(eval_id=1, retention=[], cases=cases, n_edits=6))
    names = {m.name: m.value for m in out.metrics}
    for name in ("efficacy", "generalization", "specificity", "gen_efficacy", "gen_generalization"):
        assert name in names
    prompts, expected, index = generation_probes(cases)
    n = generation_budget(ev.tok, expected)
    reference = greedy_generate(ev.backbone, ev.tok, prompts, n, cache=False)  # no KV cache
    assert greedy_generate(ev.backbone, ev.tok, prompts, n) == reference
    rows = generation_rows(cases, index, [begins_with(t, e) for t, e in zip(reference, expected)])
    for name in ("gen_efficacy", "gen_generalization", "gen_specificity"):
        assert names[name] == pytest.approx(sum(r[name] for r in rows) / len(rows))
    off = ev.evaluate(EvalRequest(eval_id=2, retention=[], cases=cases, n_edits=6, generative=False))
    assert not any(m.name.startswith("gen_") for m in off.metrics)


def test_one_budget_per_prompt_is_what_each_prompt_gets_alone(small_world):
    """Per-prompt token budgets (the generative metrics give each probe its object's length + 3): each
    row's continuation equals that prompt generated alone with its budget, cached or not."""
    model, tok, world = small_world
    prompts = [c.prompt for c in world.edit_cases(5, seed=9)]
    budgets = [1, 4, 2, 4, 3]
    alone = [greedy_generate(model, tok, [p], n, cache=False)[0] for p, n in zip(prompts, budgets)]
    assert greedy_generate(model, tok, prompts, budgets) == alone
    assert greedy_generate(model, tok, prompts, budgets, cache=False) == alone
    assert len(set(alone)) > 1 and len(alone[0]) < len(alone[1])
