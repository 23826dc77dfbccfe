"""GPU placement without a GPU: a local Ray that advertises GPUs it does not have (Ray's GPU resource
is a count it hands out and narrows ``CUDA_VISIBLE_DEVICES`` by, whether or not CUDA is there) places
stand-in actors exactly as a run places its shards and its editor. Each shard gets its own bundle and
its own GPU, the editor a GPU the shards left free, and each actor's torch device is computed from
what Ray gave it, without touching CUDA. Not run on real GPUs (cluster/README.md says so)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lme_sim.runtime.devices import gpu_device, placed_device
from lme_sim.runtime.ray_utils import (
    SHARD_RESOURCE,
    actor_device,
    editor_options,
    shard_bundle,
    shard_options,
)


@pytest.mark.parametrize(
    "assigned, visible, device",
    [
        (["2"], "2", "cuda:0"),  # Ray's default: the actor sees only its GPU
        (["3"], "1,3", "cuda:1"),  # two visible, its own is the second
        (["2"], None, "cuda:2"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: it sees the whole node
    ],
)
def test_the_device_is_the_assigned_gpu_among_the_visible_ones(assigned, visible, device):
    assert gpu_device(assigned, visible) == device


def test_a_gpu_that_was_not_assigned_or_is_not_visible_is_an_error():
    with pytest.raises(RuntimeError, match="assigned it none"):
        gpu_device([], "0")
    with pytest.raises(RuntimeError, match="GPU 2 that Ray assigned is not among CUDA_VISIBLE_DEVICES='0,1'"):
        gpu_device(["2"], "0,1")


def test_outside_ray_a_device_is_used_as_given():
    assert [placed_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]


def test_the_plan_asks_for_a_whole_gpu_per_shard_or_a_slot():
    assert shard_bundle(1) == {"GPU": 1.0} and shard_options(1) == {"num_cpus": 0, "num_gpus": 1.0}
    assert shard_bundle(0.3) == {"GPU": 0.3}  # several shards (and an evaluator) on one GPU
    assert shard_bundle(0) == {SHARD_RESOURCE: 1}
    assert shard_options(0) == {"num_cpus": 0, "num_gpus": 0, "resources": {SHARD_RESOURCE: 1}}
    assert editor_options(2, 1) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert [actor_device(g) for g in (0, 0.3, 1)] == ["cpu", "cuda", "cuda"]


# Run in its own process: the suite's Ray (tests/conftest.py) has no GPUs, and a process holds one Ray.
PLACE = """
import json, os, sys
import ray
from lme_sim.runtime.devices import placed_device
from lme_sim.runtime.ray_utils import RAY_ENV, actor_device, editor_options, release, start_shards
from lme_sim.sizing import split_layers
from lme_sim.runtime.shards import call

os.environ.update(RAY_ENV)
n_gpus, noset = int(sys.argv[1]), sys.argv[2] == "noset"
env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if noset else {}
os.environ.update(env)  # the raylet and the workers it starts inherit it
ray.init(address="local", num_cpus=2, num_gpus=n_gpus, include_dashboard=False, log_to_driver=False,
         object_store_memory=96 << 20, runtime_env={"env_vars": {**RAY_ENV, **env}})


class Where:
    # a shard's or the editor's constructor, loading nothing: where Ray put it and the device it would use
    def __init__(self, model_name, layers, device, dtype=None):
        self.layers, self.device = layers, placed_device(device)

    def info(self):
        ctx = ray.get_runtime_context()
        return {"layers": (self.layers.start, self.layers.stop), "n_layers": 4, "config": None,
                "transposed": False, "param_names": {}, "device": self.device,
                "gpu_ids": [str(i) for i in ctx.get_accelerator_ids()["GPU"]],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                # the placement-group form of its resources ("GPU_group_<bundle>_<group>"), which the
                # public get_assigned_resources() folds into "GPU"
                "resources": sorted(ctx.worker.core_worker.resource_ids())}


backbone = start_shards("world:small", split_layers(4, 3), gpus=1, shard_class=Where, timeout_s=60)
editor = ray.remote(Where).options(**editor_options(0, 1)).remote("world:small", range(0, 4), actor_device(1))
print(json.dumps({"shards": [call(s, "info") for s in backbone.shards], "editor": call(editor, "info"),
                  "pg": backbone.placement_group.id.hex()}))
release([*backbone.shards, editor], backbone.placement_group)
ray.shutdown()
"""


@pytest.fixture(scope="module", params=["default", "noset"])
def placed(request):
    """Three shards with ``runtime.gpus: 1`` and an editor with ``runtime.editor.gpus: 1`` on a node with
    4 (emulated) GPUs; ``noset``: Ray told not to narrow ``CUDA_VISIBLE_DEVICES``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", PLACE, "4", request.param],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return request.param, json.loads(out.stdout.strip().splitlines()[-1])


def test_each_shard_has_its_own_bundle_and_gpu(placed):
    mode, got = placed
    shards, pg = got["shards"], got["pg"]
    assert [s["layers"] for s in shards] == [[0, 1], [1, 3], [3, 4]]
    for i, s in enumerate(shards):
        assert f"GPU_group_{i}_{pg}" in s["resources"], s["resources"]  # bundle i of the shards' group
        assert len(s["gpu_ids"]) == 1
    ids = [s["gpu_ids"][0] for s in shards]
    assert len(set(ids)) == 3  # one shard per GPU
    for s in shards:
        if mode == "default":  # Ray narrowed what the actor sees to its GPU
            assert s["visible"] == s["gpu_ids"][0] and s["device"] == "cuda:0"
        else:
            assert s["device"] == f"cuda:{s['gpu_ids'][0]}"


def test_the_editor_solves_on_a_gpu_the_shards_left_free(placed):
    mode, got = placed
    editor, pg = got["editor"], got["pg"]
    assert not any(pg in r for r in editor["resources"])  # outside the shards' placement group
    (gpu,) = editor["gpu_ids"]
    assert gpu not in {s["gpu_ids"][0] for s in got["shards"]}
    assert editor["device"] == ("cuda:0" if mode == "default" else f"cuda:{gpu}")
