"""Weight health of an edited matrix (MOSE's stability indicators): norms and condition number."""

from __future__ import annotations

import torch


def matrix_stats(W: torch.Tensor) -> dict[str, float]:
    """Frobenius norm, spectral norm and condition number (sigma_max / sigma_min) of W."""
    s = torch.linalg.svdvals(W.detach().double())
    return {"frobenius": float(s.square().sum().sqrt()), "spectral": float(s[0]),
            "condition": float(s[0] / s[-1]) if s[-1] > 0 else float("inf")}
