"""UltraEdit (Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large
Language Models", arXiv 2505.14679, TMLR 2026): a training-free lifelong editor.

Per batch, one forward and one backward pass give, at every *answer token* t (a position whose next
token is a target token) and every edited module W (the MLP output matrix by default; ``module:
gate_proj`` or ``up_proj`` edits that matrix instead, its key the block's normalized hidden state), the
module's input key k_t (d_ff for the output matrix) and the gradient g_t = dL/d(W k_t) (d_model) of the
edit loss

    L = mean over the batch's answer tokens of -log P(answer token | prefix).

A *lifelong normalizer* per weight shape (shared by the modules of that shape) keeps the running
per-dimension mean mu and standard deviation sigma of x_t = [k_t, g_t] over every batch of the run.
It is first updated with the current batch (every module of that shape), then applied:

    [k^_t, g^_t] = (x_t - mu) / sigma                                               (lifelong norm)
    v_t = -lr * ||k^_t||^2 * g^_t                                                   (pseudo-values)
    Delta = argmin_D ||K D - V||^2 + lambda ||D||^2 = (K^T K + lambda I)^-1 K^T V   (ridge, lambda=1)

with K (n x d_ff) the *raw* keys of the current batch and V (n x d_model) the pseudo-values; W (in
(d_model, d_ff) layout) gets Delta^T, solved in the n x n token space
(:func:`~lme_sim.editors.hypernet.ridge_delta`: V^T (K K^T + lambda I)^-1 K, the same matrix).

The mean and variance are updated with Chan et al.'s parallel (batched Welford) formula
(:class:`~lme_sim.editors.hypernet.RunningNorm`), the population variance M2 / count; sigma is
floored at 1e-6. The normalizers are the editor's state (``state_dict``: checkpointed, restored by
``--resume``, put back when the delta guard rejects a batch). The signals come through any
backbone (:meth:`~lme_sim.backbone.Backbone.keys_and_output_grads`), so UltraEdit runs on shards.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field

from ..arch import DEFAULT_MODULE
from ..cases import EditCase
from ..tokens import encode_pairs
from .base import Editor, EditResult, PhaseTimer, apply_layer_delta
from .edit_signals import answer_keys_and_grads
from .hparams import HParams, HParamsError
from .hypernet import RunningNorm, ridge_delta
from .registry import register


def shape_key(keys: torch.Tensor, grads: torch.Tensor) -> str:
    """The normalizer a module uses: one per weight shape, ``"<d_model>x<d_ff>"``."""
    return f"{grads.shape[-1]}x{keys.shape[-1]}"


def update_normalizers(
    norms: dict[str, RunningNorm], keys: dict[int, torch.Tensor], grads: dict[int, torch.Tensor]
) -> None:
    """Add the batch's [k, g] of every module to its shape's normalizer (created on first use)."""
    for l in keys:
        k, g = keys[l].double(), grads[l].double()
        name = shape_key(k, g)
        if name not in norms:
            norms[name] = RunningNorm(k.shape[-1] + g.shape[-1]).double()
        norms[name].update(torch.cat([k, g], -1))


def normalize(
    norm: RunningNorm, keys: torch.Tensor, grads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k^, g^): [k, g] standardized by the normalizer's running mean and std."""
    x = norm(torch.cat([keys, grads], -1).to(norm.mean.dtype))
    return x.split([keys.shape[-1], grads.shape[-1]], -1)


def pseudo_values(k_hat: torch.Tensor, g_hat: torch.Tensor, lr: float) -> torch.Tensor:
    """v_t = -lr * ||k^_t||^2 * g^_t, one row per token."""
    return -lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat


def ultraedit_delta(
    norm: RunningNorm, keys: torch.Tensor, grads: torch.Tensor, lr: float, ridge: float = 1.0
) -> torch.Tensor:
    """Delta^T = ((K^T K + ridge I)^-1 K^T V)^T, (d_model, d_ff), in float64; ``norm`` already updated."""
    k_hat, g_hat = normalize(norm, keys, grads)
    K = keys.double()
    return ridge_delta(K, pseudo_values(k_hat, g_hat, lr), ridge)


class UltraEditHParams(HParams):
    """UltraEdit (arXiv 2505.14679): lifelong-normalized pseudo-values and a ridge solve per batch.
    ``rows_per_pass``: rows per forward/backward pass (rows sorted by length, see edit_signals)."""

    # which MLP matrix of each layer (lme_sim.arch: Llama's names, mapped per architecture); the
    # published Llama-3 setting edits gate_proj and up_proj
    module: Literal["down_proj", "gate_proj", "up_proj"] = DEFAULT_MODULE
    lr: float = Field(1e-3, gt=0)  # v = -lr ||k^||^2 g^
    ridge: float = Field(1.0, gt=0)  # lambda in (K^T K + lambda I)^-1 K^T V (published: 1)


@register
class UltraEdit(Editor):
    method = "ultraedit"
    hparams_class = UltraEditHParams

    def __init__(self, lm, hparams, **kw):
        super().__init__(lm, hparams, **kw)
        try:  # before any work: the architecture has this matrix
            for l in hparams.layers:
                self.model.edit_param_name(l, hparams.module)
        except ValueError as e:
            raise HParamsError(f"editor.hparams.module: {e}") from None
        self.norms: dict[str, RunningNorm] = {}  # committed: the normalizers of the accepted batches
        self._pending: dict[str, RunningNorm] | None = None  # after the last edit, until commit

    def commit(self) -> None:
        if self._pending is not None:
            self.norms, self._pending = self._pending, None

    def discard(self) -> None:
        self._pending = None

    def edit(self, cases: list[EditCase]) -> EditResult:
        self.commit()  # the previous batch's normalizers, where nobody committed them
        self._pending = norms = copy.deepcopy(self.norms)  # small: a mean and std per dimension
        hp, timer, layers = self.hp, PhaseTimer(), list(self.hp.layers)
        with timer("keys"):
            batch = encode_pairs(self.tok, [c.prompt for c in cases], [c.target_new for c in cases])
            signals = answer_keys_and_grads(self.model, batch, layers, hp.rows_per_pass, hp.module)
        with timer("solve"):
            update_normalizers(norms, signals.keys, signals.grads)  # before they are applied
            deltas = {
                l: ultraedit_delta(
                    norms[shape_key(signals.keys[l], signals.grads[l])],
                    signals.keys[l],
                    signals.grads[l],
                    hp.lr,
                    hp.ridge,
                ).float()
                for l in layers
            }
        out = {}
        stats = {"loss_before": signals.loss.mean().item(), "answer_tokens": float(len(signals.owner))}
        with timer("apply"):
            for l, d in deltas.items():
                name, stored = apply_layer_delta(self.model, l, d, hp.module)
                out[name] = stored
                stats[f"delta_norm_l{l}"] = d.norm().item()
        return EditResult(out, dict(timer), stats)

    def state_dict(self) -> dict[str, Any]:
        self.commit()
        return {
            "normalizers": {
                name: {k: v.clone() for k, v in n.state_dict().items()} for name, n in self.norms.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms, self._pending = {}, None
        for name, buffers in state.get("normalizers", {}).items():
            norm = RunningNorm(buffers["mean"].shape[0]).to(buffers["mean"].dtype)
            norm.load_state_dict(buffers)
            self.norms[name] = norm
