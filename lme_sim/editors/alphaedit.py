"""AlphaEdit (Fang et al. 2025, "Null-Space Constrained Knowledge Editing", arXiv 2410.02355).

P = U_hat U_hat^T projects onto the null space of the preserved keys: U_hat are the
eigenvectors of C0 with eigenvalues below ``nullspace_threshold``. Per layer (eq. 15):

    Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + L2 I)^-1

where Kp Kp^T accumulates the keys of every earlier batch, recomputed on the edited model
after each batch (a fixed d_ff x d_ff matrix: the cost per edit does not grow with history).
Because the solution lies in the range of P, Delta K0 ~ 0 for preserved keys K0.
"""

from __future__ import annotations

import torch

from ..cases import EditCase
from .activations import compute_keys
from .base import register
from .covariance import cached_projectors, nullspace_projector  # noqa: F401  (nullspace_projector: public here)
from .memit import MEMIT


@register
class AlphaEdit(MEMIT):
    method = "alphaedit"

    def load_statistics(self) -> None:
        """Only the projectors are kept (C0 is not needed once P is known, and is not loaded at
        all where P is cached): on Llama-3-8B each is 14336 x 14336 float64, 1.6 GB per layer."""
        hp = self.hp
        self.P = cached_projectors(self.model, self.tok, hp.layers, hp.stats, hp.nullspace_threshold,
                                   self.world, self.progress)
        self.cache_c = {l: torch.zeros_like(self.P[l]) for l in hp.layers}

    def nullspace_dim(self, layer: int) -> int:
        return int(round(torch.trace(self.P[layer]).item()))

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        P = self.P[layer]
        A = P @ (K @ K.T + self.cache_c[layer]) + self.hp.L2 * torch.eye(P.shape[0], dtype=P.dtype)
        return torch.linalg.solve(A, P @ K @ R.T).T

    def after_batch(self, cases: list[EditCase], keys: dict[int, torch.Tensor] | None = None) -> None:
        if keys is None:
            keys = compute_keys(self.model, self.tok, cases, self.hp.layers, self.contexts, self.hp.batch_size,
                                early_stop=self.reuse)
        for l, K in keys.items():
            self.cache_c[l] += K.T.double() @ K.double()

    def state_dict(self):
        return {"cache_c": {l: c.clone() for l, c in self.cache_c.items()}}

    def load_state_dict(self, state):
        self.cache_c = {int(l): c.clone() for l, c in state["cache_c"].items()}
