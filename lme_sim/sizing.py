"""The memory plan of a run, computed from a model's config: what each runtime actor holds in tensors
(shards, the evaluator's replica, the editor's state) and the bytes of one batch's deltas.

This is the arithmetic behind cluster/README.md's Llama-3-8B sizing table, as a function, so that a
measurement (``lme-sim bench``'s ``runtime`` section, benchmarks/scale_1b.py) can print the computed
figure beside each measured one. Sizes come from the model's parameters built on the ``meta`` device
(no memory allocated), so every architecture in :data:`lme_sim.arch.ARCHS` is sized the same way.

What each actor keeps, read off the runtime's code (lme_sim/runtime/shards.py, services.py,
lme_sim/backbone.py):

* a shard: its blocks plus everything outside the blocks (embeddings, final norm, head: each shard
  keeps the module tree), in the run's dtype; per edited matrix it owns, the weights as first seen
  (float32, for the weight health), the copy saved before each batch (model dtype, to undo a rejected
  batch) and, for 16-bit weights, a float32 master. While it loads, the whole model in the run's
  dtype (it drops the blocks it does not own after loading).
* the evaluator: the whole model in the run's dtype, the sum of the deltas so far (float32 per edited
  matrix) and, for 16-bit weights, a float32 master per edited matrix.
* the editor: its state, :data:`EDITOR_STATE_MATRICES` float64 d_in x d_in matrices per edited layer
  (AlphaEdit's projector, accumulated key covariance and the batch's pending one; MEMIT's C0).
* a batch's deltas (float32, one per edited matrix), shipped once to the driver and once to each
  evaluator.

Not in the plan: activations and gradients (they depend on the batch's tokens), the interpreter,
torch and Ray themselves (a few hundred MB per process), and transient copies (an SVD of the weight
health, the solves' temporaries).
"""

from __future__ import annotations

import torch

from .arch import DEFAULT_MODULE, layers_of, weight_view

MB = 2**20
# float64 (d_in x d_in) matrices an editor holds per edited layer (d_in: the edited matrix's input size)
EDITOR_STATE_MATRICES = {"alphaedit": 3, "memit": 1}


def meta_model(config):
    """``config``'s causal LM on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def split_layers(n: int, n_shards: int, cuts: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per shard (:mod:`lme_sim.runtime.shards`): near-equal, or with
    ``cuts`` the blocks where shards 2, 3, ... begin (``runtime.cuts``; ``[21]`` on 30 blocks: 0-20 |
    21-29, to even out work that runs mostly in the later blocks)."""
    if not 1 <= n_shards <= n:
        raise ValueError(f"cannot cut {n} layers into {n_shards} shards (need 1 <= shards <= layers)")
    if cuts is None:
        bounds = [round(i * n / n_shards) for i in range(n_shards + 1)]
    else:
        bounds = [0, *cuts, n]
        if len(cuts) != n_shards - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"cuts {list(cuts)}: {n_shards} shards need {n_shards - 1} increasing cut(s) between "
                f"1 and {n - 1} (the first block of shards 2, 3, ...)"
            )
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def memory_plan(
    config,
    *,
    shards: int,
    dtype: str,
    method: str,
    layers: list[int],
    module: str = DEFAULT_MODULE,
    evaluators: int = 1,
    stored_dtype: str | None = None,
) -> dict:
    """Computed MB per actor (``"shard i"``, ``"evaluator i"``, ``"editor"``) and per batch's deltas,
    for ``method`` editing ``module`` at ``layers`` of ``config``'s model on ``shards`` shards with
    weights in ``dtype`` (e.g. "float32", "bfloat16"). ``stored_dtype``: the dtype of the checkpoint's
    tensors (None: ``dtype``); loading converts them, so while loading an actor holds the model in both
    (measured at 1B: a float32 folder loaded in bfloat16 peaked at 7.4 GiB per actor, docs/performance.md)."""
    model = meta_model(config)
    size = _bytes(dtype)
    stored = _bytes(stored_dtype) if stored_dtype is not None else size
    load_size = size + (stored if stored != size else 0)
    blocks = [sum(p.numel() for p in b.parameters()) for b in layers_of(model)]
    n_params = sum(p.numel() for p in model.parameters())  # tied weights once
    outside = n_params - sum(blocks)
    shape = tuple(weight_view(model, layers[0], module).shape)  # (out, in)
    matrix = shape[0] * shape[1]
    sixteen = size < 4
    # per edited matrix: first-seen float32 copy + saved copy (model dtype) + float32 master (16-bit)
    shard_copy = matrix * (4 + size + (4 if sixteen else 0))
    evaluator_copy = matrix * (4 + (4 if sixteen else 0))  # the deltas' sum + master
    plan: dict = {
        "parameters": n_params,
        "dtype": dtype,
        "edited_matrix": shape,
        "deltas_mb": len(layers) * matrix * 4 / MB,
    }
    for i, r in enumerate(split_layers(len(blocks), shards)):
        weights = (sum(blocks[l] for l in r) + outside) * size
        copies = sum(1 for l in layers if l in r) * shard_copy
        plan[f"shard {i}"] = _actor(
            load=n_params * load_size, weights=weights, copies=copies, layers=(r.start, r.stop - 1)
        )
    for i in range(evaluators):
        plan[f"evaluator {i}"] = _actor(
            load=n_params * load_size, weights=n_params * size, copies=len(layers) * evaluator_copy
        )
    state = EDITOR_STATE_MATRICES.get(method, 0) * len(layers) * shape[1] ** 2 * 8
    plan["editor"] = _actor(load=0, weights=0, copies=state)
    return plan


def _bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` ("float32", "bfloat16", ...)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _actor(*, load: int, weights: int, copies: int, layers: tuple[int, int] | None = None) -> dict:
    """One actor's computed MB: ``load`` (while loading), ``weights`` and ``copies`` (what it keeps
    for editing) after it, ``peak`` the larger of loading and holding."""
    out = {
        "load_mb": load / MB,
        "weights_mb": weights / MB,
        "copies_mb": copies / MB,
        "resident_mb": (weights + copies) / MB,
        "peak_mb": max(load, weights + copies) / MB,
    }
    return out if layers is None else {"layers": layers, **out}
