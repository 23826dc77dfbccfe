"""Shards as real Ray actors (num_cpus=0 plus an emulated shard resource): same edits as in-process."""

import torch

from lme_sim.editors import make_editor
from lme_sim.models import LoadedModel
from lme_sim.runtime.ray_utils import start_shards
from lme_sim.sizing import split_layers


def test_ray_shard_actors_edit_like_the_local_model(ray_session, fresh_small_world):
    model, tok, world = fresh_small_world
    cases = world.edit_cases(10, seed=2)
    backbone = start_shards("world:small", split_layers(4, 3))
    assert [r.stop - r.start for r in backbone.ranges] == [1, 2, 1]
    remote = make_editor("alphaedit", LoadedModel("world:small", backbone, tok, world), progress=False).edit(
        cases
    )
    local = make_editor("alphaedit", LoadedModel("world:small", model, tok, world), progress=False).edit(
        cases
    )
    for name, d in local.deltas.items():
        assert torch.allclose(d, remote.deltas[name], atol=1e-4), name
    # the owning actor applied the delta: its weight now equals the locally edited one
    assert torch.allclose(backbone.edit_weight(2), model.transformer.h[2].mlp.c_proj.weight.T, atol=1e-5)
