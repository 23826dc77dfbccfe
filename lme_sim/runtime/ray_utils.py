"""Starting Ray and placing shard actors (thin shells around :class:`ModelShard`)."""

from __future__ import annotations

import os

from .shards import ModelShard, ShardedBackbone, split_layers

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
SHARD_RESOURCE = "lme_shard_slot"  # what a shard asks for where there is no GPU


def init_ray(address: str | None = None, object_store_mb: int = 256, shard_slots: int = 16):
    """Connect to ``address`` or start a local Ray with capped memory and emulated shard slots."""
    os.environ.update(RAY_ENV)
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("LME_SIM_", "RAY_", "HF_"))}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        # address="local": a new Ray even where another one runs (a `ray start` cluster would be joined)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, object_store_memory=object_store_mb << 20,
                 resources={SHARD_RESOURCE: shard_slots}, include_dashboard=False, runtime_env=env,
                 log_to_driver=False)
    return ray


def start_shards(model_name: str, n_shards: int, n_layers: int, use_gpus: bool = False,
                 strategy: str = "PACK") -> ShardedBackbone:
    """One actor per contiguous layer range, placed with a placement group of one bundle each:
    a GPU where ``use_gpus``, else an emulated shard slot. ``strategy``: PACK, SPREAD,
    STRICT_PACK or STRICT_SPREAD (one shard per node)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"GPU": 1} if use_gpus else {SHARD_RESOURCE: 1}
    pg = placement_group([bundle] * n_shards, strategy=strategy)
    ray.get(pg.ready())
    actor = ray.remote(ModelShard)
    handles = [actor.options(num_cpus=0, num_gpus=1 if use_gpus else 0,
                             resources={} if use_gpus else {SHARD_RESOURCE: 1},
                             scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
               .remote(model_name, r, "cuda" if use_gpus else "cpu")
               for i, r in enumerate(split_layers(n_layers, n_shards))]
    backbone = ShardedBackbone(handles)
    backbone.placement_group = pg
    return backbone


def release(actors: list, placement_group=None) -> None:
    """Stop a run's actors and free its placement group (so the next run in this Ray can use them)."""
    import ray

    for a in actors:
        ray.kill(a)
    if placement_group is not None:
        ray.util.remove_placement_group(placement_group)
