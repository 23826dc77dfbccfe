"""Pipelined shards (issue 32): chunks of independent requests go through the shard actors at once,
with the same results as one after the other (today's path, ``pipeline=False``), and no graph or
prefix cache left on the shards."""

import pytest
import torch

from lme_sim.backbone import chunk_size
from lme_sim.editors import make_editor
from lme_sim.models import LoadedModel
from lme_sim.runtime.ray_utils import release, start_shards
from lme_sim.runtime.shards import ShardedBackbone
from lme_sim.scenario import EditorSpec
from lme_sim.sizing import split_layers


def test_chunk_size_evens_out_the_chunks_for_the_pipeline():
    assert chunk_size(10, 9, 1) == 9  # one after the other: as full as allowed (today's chunks)
    assert chunk_size(10, 32, 2) == 5  # one chunk would leave a shard idle: two of 5
    assert chunk_size(10, 9, 2) == 5
    assert chunk_size(100, 25, 2) == 25  # already 4 chunks: unchanged
    assert chunk_size(20, 9, 2) == 5  # 3 chunks -> 4, evened out
    assert chunk_size(1, 9, 2) == 9
    for n, per, depth in [(7, 3, 2), (50, 7, 3), (3, 64, 4)]:
        size = chunk_size(n, per, depth)
        assert 1 <= size <= per


@pytest.fixture(scope="module")
def two_shards(ray_session):
    backbone = start_shards("world:small", split_layers(4, 2))
    yield backbone
    release(backbone.shards, backbone.placement_group)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _held(backbone) -> list[dict]:
    import ray

    return ray.get([s.held.remote() for s in backbone.shards])


@pytest.mark.parametrize(
    ("method", "reuse", "hparams"),
    [
        ("alphaedit", True, {}),  # layers 1-2: the suffix steps (block 3) on shard 2 alone; keys pipelined
        ("alphaedit", True, {"layers": [0]}),  # the suffix steps cross both shards (blocks 1 | 2-3)
        ("alphaedit", False, {}),  # whole passes: every step crosses both shards, forward and backward
        ("ultraedit", True, {}),  # its forward/backward chunks
    ],
)
def test_pipelined_deltas_equal_todays_path(two_shards, small_world, method, reuse, hparams):
    """Same batch, same weights, one editor: deltas to 1e-5 (relative) with the pipeline on and off."""
    _, tok, world = small_world
    backbone = two_shards
    assert backbone.pipeline_depth() == 2 and backbone.pipeline_depth(range(3, 4)) == 1
    editor = make_editor(
        method, LoadedModel("world:small", backbone, tok, world), overrides=hparams, progress=False
    )
    editor.reuse = reuse
    cases = world.edit_cases(10, seed=3)
    results, overlapped = {}, []
    plain = backbone.map_chunks

    def spy(fn, chunks, blocks=None):  # which maps ran chunks side by side
        chunks = list(chunks)
        overlapped.append(len(chunks) > 1 and backbone.pipeline_depth(blocks) > 1)
        return plain(fn, chunks, blocks)

    backbone.map_chunks = spy
    try:
        for pipeline in (False, True):
            backbone.pipeline = pipeline
            backbone.save_weights(editor.hp.layers, getattr(editor.hp, "module", "down_proj"))
            results[pipeline] = editor.edit(cases)
            backbone.restore_weights()
            editor.discard()
            assert any(overlapped) == pipeline
    finally:
        backbone.pipeline = True
        del backbone.map_chunks
    today, piped = results[False], results[True]
    assert set(piped.deltas) == set(today.deltas)
    for name, d in today.deltas.items():
        assert d.norm() > 0
        assert _relative(piped.deltas[name], d) < 1e-5, name
    for k in ("target_steps_mean", "answer_tokens"):
        assert piped.stats.get(k) == today.stats.get(k)
    assert _held(backbone) == [{"graphs": 0, "prefixes": 0}] * 2


def test_pipelined_key_statistics_are_the_same_sums(two_shards, small_world):
    from lme_sim.tokens import encode_texts

    _, tok, world = small_world
    texts = world.corpus()[:120]
    batches = [encode_texts(tok, texts[i : i + 20]) for i in range(0, len(texts), 20)]
    piped = two_shards.key_moment_sums(batches, [1, 2])
    today = ShardedBackbone(two_shards.shards, pipeline=False).key_moment_sums(batches, [1, 2])
    assert piped[1] == today[1]
    for l in (1, 2):
        assert torch.equal(piped[0][l], today[0][l])


def test_no_graph_stays_on_the_shards_after_pipelined_target_optimization(two_shards, small_world):
    """As tests/test_shard_memory.py's test, with chunks in flight on both actors."""
    from lme_sim.editors.hparams import load_hparams
    from lme_sim.editors.targets import compute_targets

    _, tok, world = small_world
    hp = load_hparams("alphaedit", "world:small", {"v_num_grad_steps": 4})
    for reuse, layer in ((True, 0), (False, 2)):  # chunks through both shards
        t = compute_targets(
            two_shards, tok, world.edit_cases(8, seed=1), layer=layer, contexts=["{}"], hp=hp, reuse=reuse
        )
        assert (t.steps == 3).any()  # a last forward whose backward never ran
        assert _held(two_shards) == [{"graphs": 0, "prefixes": 0}] * 2


def test_runtime_pipeline_reaches_the_editors_backbone(small_world, tmp_path):
    """``runtime.pipeline`` (default true) is what the editor actor's backbone does; plain in-process
    shards never pipeline (two threads in one shard's model would see each other's hooks)."""
    from lme_sim.runtime.services import EditorService
    from lme_sim.runtime.shards import ModelShard
    from lme_sim.scenario import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel: world:small\nruntime: {shards: 2, pipeline: false}\n")
    assert load_scenario(path).runtime.pipeline is False
    path.write_text("name: x\nmodel: world:small\n")
    assert load_scenario(path).runtime.pipeline is True
    shards = [ModelShard("world:small", range(0, 2)), ModelShard("world:small", range(2, 4))]
    for pipeline in (False, True):
        svc = EditorService("world:small", shards, EditorSpec(method="ultraedit"), pipeline=pipeline)
        assert svc.backbone.pipeline is pipeline
        assert svc.backbone.pipeline_depth() == 1  # plain shards
