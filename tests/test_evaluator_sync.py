"""An evaluator replica only moves from version v to v + 1, loads absolute states, and refuses to
score a version it does not hold (what lets the run re-sync a restarted evaluator exactly)."""

import torch

from lme_sim.runtime.services import Evaluator

NAME = "transformer.h.2.mlp.c_proj.weight"


def test_versions_in_order_absolute_loads_and_behind_answers(small_world):
    ev = Evaluator("world:small", fluency_prompts=0)
    weight = ev.backbone.model.get_parameter(NAME)
    w0 = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    d1, d2 = (1e-2 * torch.randn(w0.shape, generator=gen) for _ in range(2))

    assert ev.apply({NAME: d2}, 2) == 0 and torch.equal(weight, w0)  # not on top of version 1: left out
    assert ev.apply({NAME: d1}, 1) == 1 and ev.apply({NAME: d2}, 2) == 2
    assert torch.allclose(weight, w0 + d1 + d2, atol=1e-6)

    case = small_world[2].edit_cases(1, seed=3)[0]
    probes = [{"edit_id": 0, "prompt": case.prompt, "value": case.target_new, "earlier": [case.target_true]}]
    assert ev.evaluate(1, 0, probes, [], version=1) == {"behind": 2}
    out = ev.evaluate(2, 1, probes, [], version=2)
    assert out["version"] == 2 and [p["model_version"] for p in out["probes"]] == [2]

    restarted = Evaluator("world:small", fluency_prompts=0)  # what Ray's restart gives: version 0
    assert restarted.evaluate(2, 1, probes, [], version=2) == {"behind": 0}
    assert restarted.load({NAME: d1 + d2}, 2) == 2
    again = restarted.evaluate(2, 1, probes, [], version=2)
    assert abs(again["probes"][0]["logprob"] - out["probes"][0]["logprob"]) < 1e-4

    assert ev.load({NAME: d1}, 1) == 1  # back to an earlier state, whatever the replica held
    assert torch.allclose(weight, w0 + d1, atol=1e-6)
    assert ev.load({}, 0) == 0 and torch.allclose(weight, w0, atol=1e-6)
    assert ev.apply({NAME: d1}, 1) == 1  # and it follows the stream again from there
