"""Starting Ray and placing actors: shards (thin shells around :class:`ModelShard`) in a placement
group, one bundle each (a whole GPU each with ``runtime.gpus: 1``, so one shard per GPU), the editor and
evaluators on GPUs where asked, the logger on the driver's node. Which GPU an actor got is Ray's choice;
the actor turns it into its torch device itself (:func:`~lme_sim.runtime.devices.placed_device`)."""

from __future__ import annotations

import json
import os

from .shards import ModelShard, ShardedBackbone

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
SHARD_RESOURCE = "lme_shard_slot"  # what a shard asks for where there is no GPU
# how long shards wait for their resources: a cluster's autoscaler may need minutes to add GPU nodes
PLACEMENT_TIMEOUT_S = {"local": 60, "cluster": 900}
_started = {"local": False}


class PlacementError(RuntimeError):
    pass


def init_ray(address: str | None = None, object_store_mb: int = 256, shard_slots: int = 16):
    """Connect to ``address`` (default: ``$RAY_ADDRESS``, set where Ray job submission runs the
    command) or start a local Ray with capped memory and emulated shard slots."""
    os.environ.update(RAY_ENV)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        # "local": always a private cluster, never one that `ray start` left running on this machine
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 2,
            object_store_memory=object_store_mb << 20,
            resources={SHARD_RESOURCE: shard_slots},
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=False,
        )
    _started["local"] = not address
    return ray


def worker_env() -> dict[str, str]:
    """What the actors need from the driver's environment: ``LME_SIM_*`` (cache folder), ``HF_*``
    (hub token, cache) and :data:`RAY_ENV`; no other ``RAY_*`` variable (a driver started by Ray
    job submission carries its node's internal ones, e.g. the raylet's pid). Under job submission
    the job's own runtime env already carries its variables: those are left out, since Ray refuses
    a driver that sets the same variable again."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {
        k: v
        for k, v in os.environ.items()
        if (k.startswith(("LME_SIM_", "HF_")) or k in RAY_ENV) and k not in taken
    }


def start_shards(
    model_name: str,
    ranges: list[range],
    *,
    gpus: float = 0,
    strategy: str = "PACK",
    dtype: str | None = None,
    timeout_s: float | None = None,
    shard_class: type = ModelShard,
    more: list[dict] = (),
) -> ShardedBackbone:
    """One actor per contiguous layer range of ``ranges`` (:func:`~lme_sim.sizing.split_layers`), placed
    with a placement group of one bundle each:
    ``gpus`` of a GPU (1: a whole one) where ``gpus`` > 0, else an emulated shard slot.
    ``strategy``: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one shard per node). Each shard loads its
    layers from ``model_name`` itself, in ``dtype``, on its GPU. ``more``: bundles after the shards' in the
    same group (the run's other actors that reserve resources, :func:`run_bundles`). :class:`PlacementError`
    if the cluster cannot hold the bundles within ``timeout_s`` (default: :data:`PLACEMENT_TIMEOUT_S`).
    ``shard_class``: what each actor runs, called as ``ModelShard`` is (tests place a stand-in that loads
    nothing)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle, n_shards = shard_bundle(gpus), len(ranges)
    pg = placement_group([bundle] * n_shards + list(more), strategy=strategy)
    timeout_s = timeout_s or PLACEMENT_TIMEOUT_S["local" if _started["local"] else "cluster"]
    if not ray.wait([pg.ready()], timeout=timeout_s)[0]:
        ray.util.remove_placement_group(pg)
        (res,) = bundle
        offered = {n["NodeID"][:8]: n["Resources"].get(res, 0) for n in ray.nodes() if n["Alive"]}
        raise PlacementError(
            f"runtime.shards / runtime.placement: {n_shards} shards need {bundle[res]:g} {res} each, "
            f"placed {strategy}{' (each on its own node)' if strategy == 'STRICT_SPREAD' else ''}"
            f"{f' beside {list(more)} for the editor and evaluators' if more else ''}; "
            f"after {timeout_s:.0f} s the "
            f"cluster offers {res} per node: {offered}"
            + (
                ""
                if gpus
                else f". Nodes of a CPU cluster need --resources '{{\"{SHARD_RESOURCE}\": N}}' in ray start"
            )
        )
    actor = ray.remote(shard_class)
    handles = [
        actor.options(
            **shard_options(gpus),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(model_name, r, actor_device(gpus), dtype)
        for i, r in enumerate(ranges)
    ]
    backbone = ShardedBackbone(handles)
    backbone.placement_group = pg
    return backbone


def shard_bundle(gpus: float) -> dict[str, float]:
    """One shard's bundle of the placement group: ``gpus`` of a GPU (1: a GPU of its own), else an
    emulated shard slot (a CPU cluster's nodes say how many shards each takes)."""
    return {"GPU": float(gpus)} if gpus else {SHARD_RESOURCE: 1}


def shard_options(gpus: float) -> dict:
    """A shard actor's own request, all of it inside its bundle (no CPU reserved: its work is torch's)."""
    if gpus:
        return {"num_cpus": 0, "num_gpus": float(gpus)}
    return {"num_cpus": 0, "num_gpus": 0, "resources": {SHARD_RESOURCE: 1}}


def editor_options(cpus: float, gpus: float) -> dict:
    """``runtime.editor``: the editor actor reserves ``cpus`` cores and ``gpus`` of a GPU for its own
    solves (AlphaEdit's projected systems, UltraEdit's ridge fits), outside the shards' placement
    group, so on a GPU the shards left free."""
    return {"num_cpus": float(cpus), "num_gpus": float(gpus)}


def actor_device(gpus: float) -> str:
    """The device an actor is told to use: "cuda" where it asked for a GPU share (which GPU is Ray's
    choice; the actor resolves it), else "cpu"."""
    return "cuda" if gpus else "cpu"


def run_bundles(n_shards: int, actors: list[dict]) -> tuple[list[dict], list[int | None]]:
    """The bundles of a run's placement group after its ``n_shards`` shards' (``more`` of
    :func:`start_shards`): one for each of ``actors`` (their actor options: the evaluators', the
    editor's) that reserves CPUs or GPUs; and each actor's bundle index in the group (None: it reserves
    nothing and sits on any of the group's bundles)."""
    more, index = [], []
    for opts in actors:
        bundle = {r: float(opts[k]) for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus")) if opts.get(k)}
        index.append(n_shards + len(more) if bundle else None)
        more += [bundle] if bundle else []
    return more, index


def in_group(pg, index: int | None) -> dict:
    """Actor options that put an actor in a run's placement group: in bundle ``index``, or on any of
    its bundles (None)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = -1 if index is None else index
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)}


def start_logger(db: str):
    """The one logger actor of a database (every run of a study logs through it), on this node."""
    import ray

    from ..storage.logger import RunLogger

    return ray.remote(RunLogger).options(num_cpus=0, **on_this_node()).remote(db)


def placement_summary(backbone: ShardedBackbone) -> str:
    """Which node holds which shard, e.g. ``layers 0-1 on node 1a2b3c4d (10.0.0.5); ...``."""
    import ray
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(backbone.placement_group)["bundles_to_node_id"]
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return "; ".join(
        f"layers {r.start}-{r.stop - 1} on node {nodes[i][:8]} ({ips.get(nodes[i], '?')})"
        for i, r in enumerate(backbone.ranges)
    )


def on_this_node() -> dict:
    """Actor options that pin an actor to the driver's node: the logger, so that the DuckDB file is
    written where the driver (and the user who named the path) is."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
    }


def evaluator_options(backend: str, tensor_parallel_size: int, gpus: float) -> dict:
    """An evaluator takes ``gpus`` of a GPU where > 0 (vLLM: that per tensor-parallel rank), from
    what the shards' placement group left free; otherwise it needs no resources."""
    if not gpus:
        return {"num_cpus": 0}
    return {"num_cpus": 0, "num_gpus": float(gpus) * (tensor_parallel_size if backend == "vllm" else 1)}


def release(actors: list, placement_group=None) -> None:
    """Stop a run's actors and free its placement group (so the next run in this Ray can use them)."""
    import ray

    for a in actors:
        ray.kill(a)
    if placement_group is not None:
        ray.util.remove_placement_group(placement_group)
