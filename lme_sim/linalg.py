"""Small linear-algebra functions shared by the backbone, the shards and the editors' statistics."""

from __future__ import annotations

import torch


def nullspace_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P = U_hat U_hat^T over the eigenvectors of C0 whose eigenvalues are < threshold
    (the null space of the preserved keys; arXiv 2410.02355 eq. 8)."""
    eigvals, eigvecs = torch.linalg.eigh(C0.double())
    U = eigvecs[:, eigvals < threshold]
    return U @ U.T
