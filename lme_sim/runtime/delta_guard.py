"""The delta guard: a batch whose deltas are not finite or explode is rejected before any model keeps it.

An editor that diverges (a singular solve, a learning rate too high, a bad hypernetwork output)
returns NaN/Inf or a delta far larger than the weight it changes. Written into the model, one such
batch ruins every later edit and evaluation. :func:`delta_problem` names what is wrong with a
batch's deltas (None if nothing is); :class:`~lme_sim.runtime.services.EditorService` then puts
back the weights and the editor state it saved before the batch, so shards, local replicas and
evaluators never see the batch, and the coordinator logs it in ``rejected_batches``.
"""

from __future__ import annotations

import torch

from ..scenario import DEFAULT_MAX_DELTA_NORM


def delta_problem(
    deltas: dict[str, torch.Tensor],
    weight_norms: dict[str, float],
    max_delta_norm: float = DEFAULT_MAX_DELTA_NORM,
) -> str | None:
    """Why ``deltas`` must not be applied (NaN/Inf values, or ``||delta|| > max_delta_norm * ||W||``
    with ``weight_norms[name]`` = ||W|| before the batch); None if they may."""
    for name, d in sorted(deltas.items()):
        bad = int((~torch.isfinite(d)).sum())
        if bad:
            return f"{name}: {bad} of {d.numel()} delta values are NaN/Inf"
        norm, w = float(d.double().norm()), weight_norms[name]
        if norm > max_delta_norm * w:
            return (
                f"{name}: delta norm {norm:.4g} is {norm / max(w, 1e-30):.3g}x the weight's norm {w:.4g} "
                f"(limit: max_delta_norm = {max_delta_norm:g})"
            )
    return None
