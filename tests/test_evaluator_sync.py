"""An evaluator replica only moves from version v to v + 1, loads absolute states, and refuses to
score a version it does not hold (what lets the run re-sync a restarted evaluator exactly)."""

import torch

from lme_sim.runtime.services import Behind, EvalRequest, Evaluator, RetentionItem

NAME = "transformer.h.2.mlp.c_proj.weight"


def test_versions_in_order_absolute_loads_and_behind_answers(small_world):
    ev = Evaluator("world:small")
    weight = ev.backbone.model.get_parameter(NAME)
    w0 = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    d1, d2 = (1e-2 * torch.randn(w0.shape, generator=gen) for _ in range(2))

    assert ev.follow({NAME: d2}, 2) == 0 and torch.equal(weight, w0)  # not on top of version 1: left out
    assert ev.follow({NAME: d1}, 1) == 1 and ev.follow({NAME: d2}, 2) == 2
    assert torch.allclose(weight, w0 + d1 + d2, atol=1e-6)

    case = small_world[2].edit_cases(1, seed=3)[0]
    probes = [RetentionItem(0, case.prompt, case.target_new, [case.target_true])]

    def request(eval_id):
        return EvalRequest(eval_id=eval_id, retention=probes, cases=[], n_edits=1)

    assert ev.evaluate(request(1), version=1) == Behind(2)
    out = ev.evaluate(request(2), version=2)
    assert out.version == 2 and [p.batch_id for p in out.probes] == [1]  # version 2: after batch 1

    restarted = Evaluator("world:small")  # what Ray's restart gives: version 0
    assert restarted.evaluate(request(2), version=2) == Behind(0)
    assert restarted.load({NAME: d1 + d2}, 2) == 2
    again = restarted.evaluate(request(2), version=2)
    assert abs(again.probes[0].logprob - out.probes[0].logprob) < 1e-4

    assert ev.load({NAME: d1}, 1) == 1  # back to an earlier state, whatever the replica held
    assert torch.allclose(weight, w0 + d1, atol=1e-6)
    assert ev.load({}, 0) == 0 and torch.allclose(weight, w0, atol=1e-6)
    assert ev.follow({NAME: d1}, 1) == 1  # and it follows the stream again from there


def test_retention_without_an_earlier_value_is_never_vacuous(small_world):
    """A fact edited with no earlier value (a ZsRE case without a prediction) is retained only when every
    token of its value is the model's top choice; it used to count as retained whatever the model said."""
    model, tok, world = small_world
    ev = Evaluator("world:small")
    known = world.known_cases()[:20]
    preds = [model(**tok(c.prompt, return_tensors="pt")).logits[0, -1].argmax().item() for c in known]
    hit = next(c for c, p in zip(known, preds) if tok.decode([p]).strip() == c.target_true)
    miss = world.edit_cases(1, seed=5)[0]  # a counterfactual object the unedited model does not say
    items = [
        RetentionItem(0, hit.prompt, hit.target_true, []),  # the model says it: retained
        RetentionItem(1, miss.prompt, miss.target_new, []),
    ]  # an object it does not say: not retained
    out = ev.evaluate(EvalRequest(eval_id=1, retention=items, cases=[], n_edits=2))
    assert [p.correct for p in out.probes] == [True, False]
    assert [m.value for m in out.metrics if m.name == "retention"] == [0.5]
