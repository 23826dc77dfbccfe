"""MOSE (Multiplicative Orthogonal Sequential Editing, arXiv 2601.07873).

Each edited matrix W (d_model x d_ff, the MLP output projection) becomes W' = W0 Q with Q
orthogonal and block-diagonal over W's input side, each block a Cayley transform of a
skew-symmetric matrix built from trainable parameters theta_b:

    S_b = (theta_b - theta_b^T) / 2,     Q_b = (I - S_b)(I + S_b)^-1

so singular values, norms and condition number of W' are those of W0 however many edits come.
theta is fitted to each batch by Adam on the new objects' NLL and carries over to the next batch:
edits accumulate into one rotation. Published defaults (famoustourist/MOSE, hparams/OFT/llama3-8b.yaml:
4 blocks, Adam lr 5e-4, ``num_steps: 25``, ``batch_size: 1``; optionally the COFT projection
||theta_b||_F <= eps b^2 / sqrt(n_blocks), ``project_batch`` in easyeditor/models/oft/oft_main.py
lines 212-220, applied before every forward pass, line 128).

The schedule. The published loop (``execute_oft``, oft_main.py lines 362-405) runs ``num_steps``
*epochs*; each epoch takes one Adam step per chunk of ``batch_size`` requests, on the chunk's
token-mean NLL (``pred.loss``). With its ``batch_size: 1`` a call with N requests takes 25 N
single-request steps. ``micro_batch`` reproduces that (``micro_batch: 1`` is the published
schedule); ``micro_batch: null``, lme-sim's default, is lme-sim's own choice: one step per epoch on
the whole batch (the mean over requests of each request's token-mean NLL), 25 steps per call however
large the batch. The two coincide for one request per call, the paper's protocol.

The model holds W_cur = W0 Q_old; the forward pass during fitting multiplies W's input by
M = Q_old^T Q(theta) block by block (W_cur M = W0 Q(theta)), so no d_ff x d_ff matrix and no
copy of W0 is ever formed, and the fit runs unchanged over shards. M goes to the model as its two
factors (:class:`~lme_sim.backbone.Rotation`): one request at a time, its ~20 token rows are
rotated by one solve per block against them, and M itself is never formed (``rotate_blocks``).
The delta written at the end is W_cur (M - I).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..backbone import Rotation
from ..cases import EditCase
from ..linalg import cayley
from ..scoring import target_logprobs
from ..tokens import encode_pairs
from .base import Editor, EditResult, PhaseTimer, apply_layer_delta
from .hparams import HParams
from .registry import register
from .targets import frozen


class MOSEHParams(HParams):
    """Multiplicative orthogonal editing (arXiv 2601.07873): a block-diagonal Cayley rotation of W's input."""

    n_blocks: int = Field(4, gt=0)  # diagonal blocks of Q (d_ff must be divisible by it)
    optimizer: Literal["adam", "sgd"] = "adam"  # on the rotation parameters (published: Adam)
    lr: float = 5e-4
    num_steps: int = Field(25, gt=0)  # epochs: passes over the batch (see micro_batch)
    # requests per Adam step within an epoch; 1: the published schedule (num_steps x N steps for N
    # requests); null: lme-sim's choice, one step per epoch on the whole batch
    micro_batch: int | None = Field(None, gt=0)
    loss_stop: float = 0.0  # stop a batch's fit once the mean NLL is below this (0: never, as published)
    coft_eps: float | None = 1e-5  # published constraint ||theta_b|| <= eps b^2 / sqrt(n_blocks); null: off


def times_blocks(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """W M for W (d, n_blocks * b) and block-diagonal M given as (n_blocks, b, b)."""
    n, b, _ = M.shape
    return torch.einsum("dnj,nji->dni", W.reshape(W.shape[0], n, b), M.to(W.dtype)).reshape(W.shape)


def coft_project(theta: torch.Tensor, eps: float) -> torch.Tensor:
    """The published code's constraint: each block's ||theta_b||_F at most eps * b^2 / sqrt(n_blocks)."""
    n, b, _ = theta.shape
    bound = eps * b * b / n**0.5
    norms = theta.flatten(1).norm(dim=1).clamp_min(1e-30)
    return theta * torch.clamp(bound / norms, max=1.0)[:, None, None]


def micro_batches(n: int, size: int | None) -> list[torch.Tensor | None]:
    """The chunks of an epoch: ``[None]`` (the whole batch, one step) or the row indices of each chunk
    of ``size`` requests in order, as the published loop's ``chunks(texts, batch_size)``."""
    if size is None:
        return [None]
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


def request_mean_nll(rows: torch.Tensor, logp: torch.Tensor, target_len: torch.Tensor) -> torch.Tensor:
    """The mean over requests of each request's token-mean NLL (the whole-batch loss)."""
    per = torch.zeros(len(target_len), device=logp.device).index_add(0, rows.to(logp.device), -logp)
    return (per / target_len.to(logp.device)).mean()


@register
class MOSE(Editor):
    method = "mose"
    hparams_class = MOSEHParams

    def __init__(self, lm, hparams, **kw):
        super().__init__(lm, hparams, **kw)
        self.theta: dict[int, torch.Tensor] = {}
        for layer in hparams.layers:
            d_ff = self.model.edit_weight(layer).shape[1]
            if d_ff % hparams.n_blocks:
                raise ValueError(
                    f"mose: d_ff = {d_ff} of layer {layer} is not divisible by n_blocks = {hparams.n_blocks}"
                )
            b = d_ff // hparams.n_blocks
            self.theta[layer] = torch.zeros(hparams.n_blocks, b, b)
        self._pending: dict[int, torch.Tensor] = {}  # theta after the last edit, until commit

    def rotation(self, layer: int) -> torch.Tensor:
        """The accumulated Q of ``layer`` as (n_blocks, b, b) blocks."""
        return cayley(self.theta[layer].double())

    def edit(self, cases: list[EditCase]) -> EditResult:
        self.commit()  # the previous batch's rotation, where nobody committed it
        hp, model = self.hp, self.model
        timer = PhaseTimer()
        batch = encode_pairs(self.tok, [c.prompt for c in cases], [c.target_new for c in cases])
        q_old_t64 = {l: self.rotation(l).transpose(-1, -2) for l in hp.layers}  # Q_old^T, once per batch
        q_old_t = {l: q.float() for l, q in q_old_t64.items()}
        params = {l: self.theta[l].clone().requires_grad_(True) for l in hp.layers}
        opt = (torch.optim.Adam if hp.optimizer == "adam" else torch.optim.SGD)(
            list(params.values()), lr=hp.lr
        )
        chunks = micro_batches(len(batch), hp.micro_batch)
        loss_value, steps = float("nan"), 0
        with timer("solve"), frozen(model):
            for _epoch in range(hp.num_steps):
                losses = []
                for rows in chunks:
                    part = batch if rows is None else batch.select(rows)
                    rotate = {l: Rotation(q_old_t[l], p) for l, p in params.items()}  # M = Q_old^T Q(theta)
                    r, lp, _ = target_logprobs(model, part, rotate=rotate)
                    loss = (
                        request_mean_nll(r, lp, part.target_len) if rows is None else -lp.mean()
                    )  # the published chunk loss is the token mean (HF's pred.loss)
                    losses.append(loss.item())
                    if rows is None and losses[-1] < hp.loss_stop:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
                    if hp.coft_eps is not None:
                        with torch.no_grad():
                            for p in params.values():
                                p.copy_(coft_project(p, hp.coft_eps))
                loss_value = sum(losses) / len(losses)
                if loss_value < hp.loss_stop:
                    break
        deltas, stats = {}, {"loss": loss_value, "steps": steps}
        self._pending = {l: p.detach().clone() for l, p in params.items()}
        with timer("apply"):
            for l in params:
                Q = cayley(self._pending[l].double())
                eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
                W = model.edit_weight(l).double()
                delta = times_blocks(W, q_old_t64[l] @ Q - eye).float()
                name, stored = apply_layer_delta(model, l, delta)
                deltas[name] = stored
                stats[f"delta_norm_l{l}"] = delta.norm().item()
                stats[f"rotation_l{l}"] = (Q - eye).flatten(1).norm(dim=1).square().sum().sqrt().item()
        return EditResult(deltas, dict(timer), stats)

    def commit(self) -> None:
        self.theta.update(self._pending)
        self._pending = {}

    def discard(self) -> None:
        self._pending = {}

    def state_dict(self):
        self.commit()
        return {"theta": {l: t.clone() for l, t in self.theta.items()}}

    def load_state_dict(self, state):
        self.theta = {int(l): t.clone() for l, t in state["theta"].items()}
