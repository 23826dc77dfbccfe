"""Weight health of an edited matrix (MOSE's stability indicators): norms and condition number."""

from __future__ import annotations

import torch


def matrix_stats(W: torch.Tensor) -> dict[str, float]:
    """Frobenius norm, spectral norm and condition number (sigma_max / sigma_min) of W."""
    s = torch.linalg.svdvals(W.detach().double())
    return {
        "frobenius": float(s.square().sum().sqrt()),
        "spectral": float(s[0]),
        "condition": float(s[0] / s[-1]) if s[-1] > 0 else float("inf"),
    }


def add_delta(param: torch.Tensor, delta: torch.Tensor, masters: dict[str, torch.Tensor], name: str) -> None:
    """``param += delta`` in place: the one way lme-sim changes a weight (editors, shards, evaluator
    replicas, training). A 16-bit ``param`` gets a float32 master copy ``masters[name]`` that takes the
    exact sum and is rounded once per write, so a long stream of small deltas does not vanish in
    bf16/fp16 rounding."""
    with torch.no_grad():
        if param.dtype.itemsize >= 4:
            param.add_(delta.to(dtype=param.dtype, device=param.device))
            return
        exact = masters.setdefault(name, param.float())
        exact.add_(delta.to(dtype=torch.float32, device=exact.device))
        param.copy_(exact)
