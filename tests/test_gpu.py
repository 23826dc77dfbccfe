"""The GPU path, on a machine with a CUDA GPU (``make test-gpu``; not part of ``make test``): shards
and the evaluator share one GPU (``runtime.gpus: 0.3``), shards load their layers on it (float32:
the same edits as on the CPU; bfloat16: a whole run through ``lme-sim run``)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lme_sim.editors import make_editor
from lme_sim.models import LoadedModel
from lme_sim.runtime.ray_utils import release, start_shards
from lme_sim.runtime.shards import call
from lme_sim.sizing import split_layers
from lme_sim.storage.logger import read_only_query

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_shards_on_one_gpu_edit_like_the_cpu(ray_session, fresh_small_world):
    model, tok, world = fresh_small_world
    cases = world.edit_cases(10, seed=2)
    backbone = start_shards("world:small", split_layers(4, 2), gpus=0.3)
    try:
        infos = [call(s, "info") for s in backbone.shards]
        assert [i["device"] for i in infos] == ["cuda:0", "cuda:0"], infos
        remote = make_editor(
            "alphaedit", LoadedModel("world:small", backbone, tok, world), progress=False
        ).edit(cases)
    finally:
        release(backbone.shards, backbone.placement_group)
    local = make_editor("alphaedit", LoadedModel("world:small", model, tok, world), progress=False).edit(
        cases
    )
    for name, d in local.deltas.items():
        assert torch.allclose(d, remote.deltas[name], atol=1e-3, rtol=1e-3), name


def test_run_with_bf16_shards_and_evaluator_sharing_a_gpu(tmp_path, small_world):
    db = tmp_path / "gpu.duckdb"
    (tmp_path / "gpu.yaml").write_text(f"""
name: gpu
model: world:small
data: {{kind: world, n_edits: 20, seed: 1}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 0}}
runtime: {{shards: 2, evaluators: 1, gpus: 0.3, dtype: bfloat16}}
db: {db}
""")
    out = subprocess.run(
        [str(Path(sys.executable).with_name("lme-sim")), "run", str(tmp_path / "gpu.yaml")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "placement PACK: layers 0-1 on node" in out.stdout
    ((efficacy,),) = read_only_query(
        db, "select value from metrics where name = 'efficacy' order by eval_id desc limit 1"
    )[1]
    print(out.stdout)
    assert efficacy >= 0.8
