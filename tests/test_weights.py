"""Weight health: the Gram-matrix path equals the singular values of W, and falls back where it cannot."""

import math

import pytest
import torch

from lme_sim.weights import matrix_stats


def _reference(W: torch.Tensor) -> dict[str, float]:
    s = torch.linalg.svdvals(W.double())
    return {
        "frobenius": float(s.square().sum().sqrt()),
        "spectral": float(s[0]),
        "condition": float(s[0] / s[-1]) if s[-1] > 0 else math.inf,
    }


def _with_singular_values(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    return U[:, :k] @ torch.diag(s) @ V[:, :k].T


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (64, 64)])
@pytest.mark.parametrize("condition", [3.0, 1e4, 1e9])  # 1e9: beyond the Gram path, svdvals answers
def test_matrix_stats_equal_the_singular_values(shape, condition):
    m, n = shape
    k = min(m, n)
    s = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64) * 7.0
    W = _with_singular_values(m, n, s, seed=k)
    got, ref = matrix_stats(W), _reference(W)
    for key in ("frobenius", "spectral", "condition"):
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key
    assert got["condition"] == pytest.approx(condition, rel=1e-6)


def test_a_singular_matrix_has_an_infinite_condition_number():
    W = torch.zeros(8, 20)
    W[0, 0] = 2.0
    got = matrix_stats(W)
    assert got["spectral"] == 2.0 and got["frobenius"] == 2.0
    assert got["condition"] > 1e12  # svdvals' sigma_min of a rank-1 matrix: 0 or rounding noise
