"""Placing the run's actors: shards that cannot be placed fail with the fields named, the logger
stays on the driver's node, and the driver's environment reaches the actors even under Ray job
submission (whose own runtime env Ray refuses to see set twice)."""

import json

import pytest

from lme_sim.runtime.ray_utils import (
    PlacementError,
    evaluator_options,
    on_this_node,
    start_shards,
    worker_env,
)
from lme_sim.sizing import split_layers


def test_unplaceable_shards_fail_naming_the_fields(ray_session):
    ray = ray_session

    def reserved():
        return sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())

    before = reserved()
    with pytest.raises(
        PlacementError,
        match=r"runtime.shards / runtime.placement: 2 shards need 1 lme_shard_slot "
        r"each, placed STRICT_SPREAD \(each on its own node\); after 3 s .*: \{'",
    ):
        start_shards("world:small", split_layers(4, 2), strategy="STRICT_SPREAD", timeout_s=3)
    assert reserved() == before  # the failed group was removed: nothing left reserved


def test_logger_is_pinned_to_the_drivers_node(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Where:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    actor = Where.options(**on_this_node()).remote()
    assert ray.get(actor.node.remote()) == ray.get_runtime_context().get_node_id()
    ray.kill(actor)


def test_evaluators_take_gpu_shares():
    assert evaluator_options("hf", 1, 0) == {"num_cpus": 0}
    assert evaluator_options("hf", 4, 1.0) == {"num_cpus": 0, "num_gpus": 1.0}
    assert evaluator_options("vllm", 2, 1.0) == {"num_cpus": 0, "num_gpus": 2.0}
    assert evaluator_options("hf", 1, 0.3) == {"num_cpus": 0, "num_gpus": 0.3}


def test_worker_env_under_ray_job_submission(monkeypatch):
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_env = {"env_vars": {"LME_SIM_CACHE": "/shared/lme-cache"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("LME_SIM_CACHE", "/shared/lme-cache")  # the job's runtime env set it here too
    monkeypatch.setenv("HF_TOKEN", "t")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # init_ray sets it
    monkeypatch.setenv("RAY_RAYLET_PID", "4242")  # the head's raylet: meaningless on other nodes
    env = worker_env()
    assert "LME_SIM_CACHE" not in env and env["HF_TOKEN"] == "t" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert not {"RAY_ADDRESS", "RAY_RAYLET_PID", "RAY_JOB_CONFIG_JSON_ENV_VAR"} & set(env)
    assert _merge_runtime_env(job_env, {"env_vars": env}) is not None  # what ray.init does in a job driver
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert worker_env()["LME_SIM_CACHE"] == "/shared/lme-cache"  # outside a job: passed on
