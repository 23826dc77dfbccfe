"""The torch device an actor uses, from what Ray gave it.

A scenario says only whether an actor gets a GPU (``runtime.gpus``, ``runtime.editor.gpus``); which GPU
is Ray's choice, made when the actor is placed. Ray then normally narrows ``CUDA_VISIBLE_DEVICES`` to the
actor's GPUs, so the actor's GPU is ``cuda:0`` of what it sees, whatever its number on the node. Some
clusters tell Ray not to (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``, as vLLM's own launchers do):
every actor of a node then sees every GPU, and a plain ``"cuda"`` would put all of them on the first
one. :func:`gpu_device` covers both: the device is the position of the actor's GPU among those it sees.
"""

from __future__ import annotations

import os


def gpu_device(assigned: list[str], visible: str | None) -> str:
    """``cuda:<i>``: where the first of the GPUs Ray ``assigned`` (their ids on the node) sits among the
    ``visible`` ones (``CUDA_VISIBLE_DEVICES``; None: unset, every GPU of the node is visible)."""
    if not assigned:
        raise RuntimeError("this actor asked for a GPU but Ray assigned it none")
    gpu = str(assigned[0])
    if visible is None:
        return f"cuda:{gpu}"
    seen = [v.strip() for v in visible.split(",") if v.strip()]
    if gpu not in seen:
        raise RuntimeError(f"GPU {gpu} that Ray assigned is not among CUDA_VISIBLE_DEVICES={visible!r}")
    return f"cuda:{seen.index(gpu)}"


def placed_device(device: str) -> str:
    """``device`` as this process should use it: ``"cuda"`` in a Ray actor that was given a GPU becomes
    that GPU (:func:`gpu_device`); anything else (``"cpu"``, ``"cuda:1"``, ``"cuda"`` outside Ray, in
    process) is returned as it is."""
    if device != "cuda":
        return device
    assigned = ray_gpu_ids()
    return gpu_device(assigned, os.environ.get("CUDA_VISIBLE_DEVICES")) if assigned else device


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned this process (empty outside a Ray worker, or where it got none)."""
    import sys

    if "ray" not in sys.modules:  # never imported: not a Ray worker, and no reason to import it here
        return []
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
