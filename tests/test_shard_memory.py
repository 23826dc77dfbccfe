"""Large-model memory on shards: 16-bit loading, float32 master copies of edited weights, key
statistics summed on the shard owning each layer, AlphaEdit projectors computed there and cached."""

import copy

import pytest
import torch

from lme_sim.backbone import LocalBackbone, Plan, Positions
from lme_sim.editors.covariance import cached_projectors, corpus_texts, second_moment, stats_folder
from lme_sim.editors.hparams import load_hparams
from lme_sim.hooks import PassThrough
from lme_sim.linalg import nullspace_projector
from lme_sim.models import LoadedModel
from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers
from lme_sim.tokens import encode_texts


def _shards(model, n, **kw):
    return [ModelShard(copy.deepcopy(model), r, **kw) for r in split_layers(4, n)]


def test_shard_loads_its_layers_in_bf16_and_drops_the_rest(small_world):
    model, tok, world = small_world
    shard = ModelShard("world:small", range(2, 4), dtype="bfloat16")  # loads by name, as the actors do
    blocks = shard.model.transformer.h
    assert [isinstance(b, PassThrough) for b in blocks] == [True, True, False, False]
    assert {p.dtype for p in shard.model.parameters()} == {torch.bfloat16}
    first = ModelShard("world:small", range(0, 2), dtype="bfloat16")
    ids, mask = encode_texts(tok, [c.prompt for c in world.edit_cases(8, seed=4)])
    at = Positions(torch.arange(8), mask.sum(1) - 1)
    bf16 = ShardedBackbone([first, shard]).run(ids, mask, Plan(logits=at)).logits
    fp32 = LocalBackbone(model).run(ids, mask, Plan(logits=at)).logits
    assert bf16.dtype == torch.float32 and bf16.device.type == "cpu"
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.75
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_many_small_deltas_survive_in_bf16(small_world):
    """Each delta is below half a bf16 step of W: added to a bf16 weight directly it would vanish;
    the shard's float32 master copy keeps the exact sum."""
    model, _, _ = small_world
    shard = ModelShard(copy.deepcopy(model), range(0, 4), dtype="bfloat16")
    name = "transformer.h.1.mlp.c_proj.weight"
    w0 = dict(shard.model.named_parameters())[name].detach().float().clone()
    step = 1e-3 * w0.abs().clamp(min=1e-2)  # ~1/8 of a bf16 step at each entry
    naive = w0.to(torch.bfloat16)
    for _ in range(100):
        shard.apply_deltas({name: step})
        naive = naive + step.to(torch.bfloat16)
    want = w0 + 100 * step
    got = dict(shard.model.named_parameters())[name].detach().float()
    ulp = want.abs() * 2**-7
    assert ((got - want).abs() <= ulp).all()
    assert ((naive.float() - want).abs() > ulp).float().mean() > 0.5  # what the master copy prevents


class _Counting:
    """A shard whose method calls are counted (plain objects stand in for the Ray actors)."""

    def __init__(self, shard):
        self.shard, self.calls = shard, {}

    def __getattr__(self, name):
        fn = getattr(self.shard, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args)

        return counted


def test_key_statistics_stay_on_the_owning_shard(small_world):
    model, tok, world = small_world
    texts = world.corpus()[:200]
    local = second_moment(model, tok, [0, 1], texts, batch_size=50, progress=False)
    shards = [_Counting(s) for s in _shards(model, 2)]  # layers 0-1 and 2-3
    sharded = second_moment(ShardedBackbone(shards), tok, [0, 1], texts, batch_size=50, progress=False)
    for l in (0, 1):
        assert torch.allclose(local[l], sharded[l], atol=1e-8, rtol=1e-6)
    assert shards[0].calls == {"info": 1, "accumulate_moments": 4, "take_moments": 1}
    assert "accumulate_moments" not in shards[1].calls  # owns no requested layer: never run


def test_projectors_are_computed_by_the_owning_shard_and_cached(small_world, tmp_path, monkeypatch):
    monkeypatch.setenv("LME_SIM_CACHE", str(tmp_path))
    model, tok, world = small_world
    hp = load_hparams("alphaedit", "world:small")
    layers = [1, 2]
    shards = [_Counting(s) for s in _shards(model, 2)]
    backbone = ShardedBackbone(shards)
    lm = LoadedModel("world:small", backbone, tok, world)
    P = cached_projectors(lm, layers, hp.stats, hp.nullspace_threshold, progress=False)
    assert shards[0].calls["nullspace_projector"] == 1 and shards[1].calls["nullspace_projector"] == 1
    C0 = second_moment(
        model, tok, layers, corpus_texts(hp.stats, world), max_length=hp.stats.max_length, progress=False
    )
    for l in layers:
        assert torch.allclose(P[l], nullspace_projector(C0[l], hp.nullspace_threshold), atol=1e-8)
    folder = stats_folder(backbone, layers, hp.stats)
    t = hp.nullspace_threshold
    assert sorted(p.name for p in folder.iterdir()) == [
        f"layer1-nullspace-{t:g}.pt",
        "layer1.pt",
        f"layer2-nullspace-{t:g}.pt",
        "layer2.pt",
    ]
    (folder / "layer1.pt").unlink()  # with P cached, C0 is not needed again
    again = cached_projectors(lm, layers, hp.stats, hp.nullspace_threshold, progress=False)
    assert shards[0].calls["nullspace_projector"] == 1 and shards[0].calls.get("take_moments") == 1
    for l in layers:
        assert torch.equal(again[l], P[l])


def test_projector_cache_names_the_threshold(small_world, tmp_path, monkeypatch):
    monkeypatch.setenv("LME_SIM_CACHE", str(tmp_path))
    model, tok, world = small_world
    hp = load_hparams("alphaedit", "world:small")
    a = cached_projectors(LoadedModel("world:small", model, tok, world), [2], hp.stats, 1e-3, progress=False)[
        2
    ]
    b = cached_projectors(LoadedModel("world:small", model, tok, world), [2], hp.stats, 1e-2, progress=False)[
        2
    ]
    assert torch.trace(b) > torch.trace(a)  # a higher threshold leaves a larger null space


@pytest.mark.parametrize("bad", ["SCATTER", "pack"])
def test_placement_must_be_a_ray_strategy(tmp_path, bad):
    from lme_sim.scenario import ScenarioError, load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(f"name: x\nmodel: world:small\nruntime: {{shards: 2, placement: {bad}}}\n")
    with pytest.raises(ScenarioError, match=r"s.yaml: field 'runtime.placement'"):
        load_scenario(path)


def test_no_graph_stays_on_the_shards_after_target_optimization(small_world):
    """Each optimization's last forward has no backward (every request converged or ran out of
    steps): the graphs it left on the shards go with it, on the suffix path and the whole passes."""
    from lme_sim.editors.targets import compute_targets

    model, tok, world = small_world
    shards = _shards(model, 2)
    hp = load_hparams("alphaedit", "world:small", {"v_num_grad_steps": 4})
    for reuse in (True, False):
        t = compute_targets(
            ShardedBackbone(shards),
            tok,
            world.edit_cases(4, seed=1),
            layer=2,
            contexts=["{}"],
            hp=hp,
            reuse=reuse,
        )
        assert (t.steps == 3).any()  # a last forward whose backward never ran
        assert [len(s._graphs) for s in shards] == [0, 0]
        assert [len(s._prefixes) for s in shards] == [0, 0]
