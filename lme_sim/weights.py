"""Weight health of an edited matrix (MOSE's stability indicators): norms and condition number."""

from __future__ import annotations

import torch


def matrix_stats(W: torch.Tensor) -> dict[str, float]:
    """Frobenius norm, spectral norm and condition number (sigma_max / sigma_min) of W (m x n).

    The singular values are the square roots of the eigenvalues of the smaller Gram matrix (W W^T or
    W^T W, min(m, n) square), in float64: a product and a symmetric eigensolve, ~3x faster than
    ``svdvals`` of W at SmolLM2's 576 x 1536 (docs/performance.md, "Weight health"), which a run one
    edit at a time pays per edit and matrix. The Gram matrix squares the condition number, so where
    sigma_min^2 / sigma_max^2 falls below 1e-12 (a condition number above 1e6), near what float64 can
    resolve, the values come from ``svdvals`` of W itself."""
    A = W.detach().double()
    gram = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    ev = torch.linalg.eigvalsh(gram)  # ascending: sigma_i^2
    if ev[-1] > 0 and ev[0] > 1e-12 * ev[-1]:
        s = ev.flip(0).sqrt()
    else:
        s = torch.linalg.svdvals(A)
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
