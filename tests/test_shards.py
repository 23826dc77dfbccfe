"""1 vs N shards: the same keys, hidden states, logits, gradients, deltas and metrics."""

import copy

import pytest
import torch

from lme_sim.backbone import Inject, LocalBackbone, Plan, Positions
from lme_sim.editors import make_editor
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel
from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers
from lme_sim.tokens import encode_texts


def test_split_layers():
    assert split_layers(4, 3) == [range(0, 1), range(1, 3), range(3, 4)]
    assert split_layers(30, 4)[-1].stop == 30
    with pytest.raises(ValueError, match="cannot cut 4 layers into 5 shards"):
        split_layers(4, 5)
    assert split_layers(30, 2, [21]) == [range(0, 21), range(21, 30)]  # runtime.cuts
    assert split_layers(4, 3, [1, 3]) == [range(0, 1), range(1, 3), range(3, 4)]
    for shards, bad in ((2, [1, 2]), (2, []), (2, [0]), (2, [4]), (3, [3, 2]), (3, [2, 2])):
        with pytest.raises(ValueError, match="increasing cut"):
            split_layers(4, shards, bad)


def _sharded(model, n):
    return ShardedBackbone([ModelShard(copy.deepcopy(model), r) for r in split_layers(4, n)])


def test_plan_results_and_gradients_match_across_shards(small_world):
    model, tok, world = small_world
    ids, mask = encode_texts(tok, [c.prompt for c in world.edit_cases(5, seed=1)])
    rows, pos = torch.arange(5), mask.sum(1) - 1
    at = Positions(rows, pos)
    results = {}
    for name, bb in (("local", LocalBackbone(model)), ("3 shards", _sharded(model, 3))):
        values = torch.zeros(5, model.config.n_embd, requires_grad=True)
        plan = Plan(
            keys={1: at, 3: at},
            hidden={0: at, 2: at},
            key_moments=[2],
            logits=at,
            inject=Inject(1, at, values),
        )
        out = bb.run(ids, mask, plan)
        out.logits.logsumexp(-1).sum().backward()
        results[name] = (out, values.grad)
    (a, ga), (b, gb) = results.values()
    for l in (1, 3):
        assert torch.allclose(a.keys[l], b.keys[l], atol=1e-5)
    for l in (0, 2):
        assert torch.allclose(a.hidden[l], b.hidden[l], atol=1e-5)
    assert torch.allclose(a.key_moments[2], b.key_moments[2], atol=1e-4)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_editing_same_on_1_and_3_shards(small_world, method):
    model, tok, world = small_world
    cases = world.edit_cases(20, seed=0)
    runs = {}
    for n in (1, 3):
        bb = _sharded(model, n)
        editor = make_editor(method, LoadedModel("world:small", bb, tok, world), progress=False)
        deltas = [editor.edit(cases[i : i + 10]).deltas for i in (0, 10)]
        runs[n] = (deltas, summarize(case_metrics(bb, tok, cases)))
    (d1, m1), (d3, m3) = runs[1], runs[3]
    for b1, b3 in zip(d1, d3):
        assert b1.keys() == b3.keys()
        for k in b1:
            assert torch.allclose(b1[k], b3[k], atol=1e-4), k
    assert m1 == pytest.approx(m3, abs=1e-4)
    assert m3["efficacy"] >= 0.9
