"""Small linear-algebra functions shared by the backbone, the shards and the editors' statistics."""

from __future__ import annotations

import torch


def nullspace_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P = U_hat U_hat^T over the eigenvectors of C0 whose eigenvalues are < threshold
    (the null space of the preserved keys; arXiv 2410.02355 eq. 8)."""
    eigvals, eigvecs = torch.linalg.eigh(C0.double())
    U = eigvecs[:, eigvals < threshold]
    return U @ U.T


def cayley(theta: torch.Tensor) -> torch.Tensor:
    """Q_b = (I - S_b)(I + S_b)^-1 with S_b = (theta_b - theta_b^T)/2, for theta (n_blocks, b, b): the
    Cayley transform of theta's skew-symmetric part, orthogonal (MOSE, arXiv 2601.07873).

    (I - S) and (I + S)^-1 commute, so Q = solve(I + S, I - S)."""
    S = 0.5 * (theta - theta.transpose(-1, -2))
    eye = torch.eye(theta.shape[-1], dtype=theta.dtype, device=theta.device).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S)


def rotate_blocks(
    x: torch.Tensor, base: torch.Tensor, theta: torch.Tensor, *, form: bool | None = None
) -> torch.Tensor:
    """M x for every row x of ``x`` (..., n_blocks * b), M block-diagonal with blocks base_i Q(theta_i)
    (:func:`cayley`), computed in ``base``'s dtype; differentiable in ``theta`` (and ``x``).

    With fewer rows N than b, M is never formed: Q(theta) x = solve(I + S, (I - S) x) per block, one
    LU of (I + S) (2/3 b^3 flops) and O(b^2 N) more, forward and backward, where forming M costs
    ~14/3 b^3 and its backward ~6 b^3 (MOSE one request at a time: N ~ 20 token rows against b = 384
    on SmolLM2). With N >= b, M is formed and applied (cheaper then). Both give the same M x; ``form``
    picks one (tests, benchmarks/mose_rotation.py)."""
    n, b, _ = base.shape
    rows = x.reshape(-1, n, b).to(base.dtype)  # (N, n, b)
    if form if form is not None else rows.shape[0] >= b:
        M = base @ cayley(theta.to(base.dtype))
        out = torch.einsum("rnj,nij->rni", rows, M)
    else:
        S = 0.5 * (theta - theta.transpose(-1, -2)).to(base.dtype)
        cols = rows.permute(1, 2, 0)  # (n, b, N): one column per row
        eye = torch.eye(b, dtype=base.dtype, device=base.device).expand_as(S)
        out = (base @ torch.linalg.solve(eye + S, cols - S @ cols)).permute(2, 0, 1)
    return out.reshape(x.shape).to(x.dtype)
