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
from .covariance import cached_projectors
from .hparams import TargetHParams
from .memit import MEMIT
from .registry import register


class AlphaEditHParams(TargetHParams):
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the null space
    L2: float = 10.0


@register
class AlphaEdit(MEMIT):
    method = "alphaedit"
    hparams_class = AlphaEditHParams

    def load_statistics(self) -> None:
        """Only the projectors are kept (C0 is not needed once P is known, and is not loaded at
        all where P is cached): on Llama-3-8B each is 14336 x 14336 float64, 1.6 GB per layer."""
        hp = self.hp
        P = cached_projectors(self.lm, hp.layers, hp.stats, hp.nullspace_threshold, progress=self.progress)
        self.P = {l: p.to(self.device) for l, p in P.items()}
        self.cache_c = {l: torch.zeros_like(self.P[l]) for l in hp.layers}  # Kp Kp^T, float64 (see solve)
        self._pending: dict[int, torch.Tensor] = {}

    def nullspace_dim(self, layer: int) -> int:
        return int(round(torch.trace(self.P[layer]).item()))

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Eq. 15 in float64: Kp Kp^T sums thousands of key outer products, whose small eigen-directions
        the projected system must keep (float32 is not enough for it; P and cache_c stay float64)."""
        P, K, R = self.P[layer], K.to(self.device), R.to(self.device)
        A = P @ (K @ K.T + self.cache_c[layer]) + self.hp.L2 * torch.eye(
            P.shape[0], dtype=P.dtype, device=P.device
        )
        return torch.linalg.solve(A, P @ K @ R.T).T.cpu()

    def after_batch(self, cases: list[EditCase], keys: dict[int, torch.Tensor] | None = None) -> None:
        """Kp Kp^T gains this batch's keys on the edited model: pending until :meth:`commit`. ``keys``:
        the loop's own (layer l's keys cannot change once layers below l are written)."""
        if keys is None:
            keys = compute_keys(
                self.model,
                self.tok,
                cases,
                self.hp.layers,
                self.contexts,
                groups=self.context_groups,
                batch_size=self.hp.rows_per_pass,
                early_stop=self.reuse,
            )
        self._pending = {l: (K.T.double() @ K.double()).to(self.device) for l, K in keys.items()}

    def commit(self) -> None:
        for l, kk in self._pending.items():
            self.cache_c[l] += kk
        self._pending = {}

    def discard(self) -> None:
        self._pending = {}

    def state_dict(self):
        self.commit()
        return {"cache_c": {l: c.cpu() for l, c in self.cache_c.items()}}

    def load_state_dict(self, state):
        self.cache_c = {int(l): c.to(self.device, torch.float64).clone() for l, c in state["cache_c"].items()}
