"""The learned editors' networks (RLEdit arXiv 2502.05759, on MALMEN's design arXiv 2311.04661;
HiEdit arXiv 2604.11214 adds the router).

Per edit token and edited module l the editor sees the module's input key k (d_ff) and the
gradient g of the edit loss w.r.t. the module's output (d_model); W's plain gradient is sum g k^T.
The hypernetwork maps the normalized pair [k, g] through low-rank residual blocks (with a
scale and shift per module) to a pseudo key k~ and a pseudo gradient g~, the value shift of the
token is v = -eta_l g~, and the module's delta is the ridge least-squares fit (MALMEN eq. 4)

    Delta_l = argmin ||Delta K~^T - V^T||^2 + lambda_l ||Delta||^2 = V^T (K~ K~^T + lambda_l I)^-1 K~

solved in the n x n token space, with a learned step eta_l and ridge term lambda_l per module.
At initialization the residual blocks are zero, so k~ = k, g~ = g: a ridge-preconditioned
gradient step. The HiEdit router scores every candidate module per edit from the same features.

The published RLEdit/MALMEN code differs in form: k~ and g~ stay in the normalized space, a token's
shift is v = -eta_l <k, k~> g~, and the ridge fit uses the raw keys. On SmolLM2 that form edited
0.08-0.10 worse untrained and lost efficacy in training (docs/methods.md, third round), so lme-sim
keeps the form above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from .hparams import HParams


class RunningNorm(nn.Module):
    """Per-dimension mean and std of a feature, accumulated while training and frozen after."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Chan et al.'s parallel update of mean and sum of squared deviations."""
        n = x.shape[0]
        if n == 0:
            return
        mean, m2 = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp_min(1)).sqrt().clamp_min(1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LowRankBlock(nn.Module):
    """x + (U relu(V x)) * (1 + scale_l) + shift_l, U zero at start (MALMEN's residual block)."""

    def __init__(self, dim: int, rank: int, n_modules: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Embedding(n_modules, dim)
        self.shift = nn.Embedding(n_modules, dim)
        nn.init.zeros_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, module: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x))) * (1 + self.scale(module)) + self.shift(module)


def ridge_delta(
    pseudo_keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Delta = V^T (K K^T + lam I)^-1 K for K (n, d_in), V (n, d_out): (d_out, d_in).

    ``rows`` (n,): weights c_i of a weighted fit, argmin sum_i c_i ||Delta k_i - v_i||^2 + lam ||Delta||^2
    = V^T C (K K^T C + lam I)^-1 K with C = diag(c) (push-through of the normal equations); a row of
    weight 0 drops out of the fit exactly, and the weights stay differentiable."""
    n = pseudo_keys.shape[0]
    gram = pseudo_keys @ pseudo_keys.T
    if rows is not None:
        gram, values = gram * rows[None, :], values * rows[:, None]
    A = gram + lam * torch.eye(n, dtype=pseudo_keys.dtype, device=pseudo_keys.device)
    return values.T @ torch.linalg.solve(A, pseudo_keys)


class HyperNet(nn.Module):
    """Pseudo keys and value shifts for the modules of one weight shape (d_model x d_ff)."""

    def __init__(
        self,
        d_ff: int,
        d_model: int,
        n_modules: int,
        *,
        rank: int = 64,
        n_blocks: int = 2,
        init_lr: float = 1.0,
        init_lambda: float = 1.0,
    ):
        super().__init__()
        self.d_ff, self.d_model = d_ff, d_model
        self.key_norm, self.grad_norm = RunningNorm(d_ff), RunningNorm(d_model)
        self.blocks = nn.ModuleList(LowRankBlock(d_ff + d_model, rank, n_modules) for _ in range(n_blocks))
        self.log_lr = nn.Parameter(torch.full((n_modules,), math.log(init_lr)))
        self.log_lambda = nn.Parameter(torch.full((n_modules,), math.log(init_lambda)))

    def features(self, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.key_norm(keys), self.grad_norm(grads)], -1)

    def forward(
        self, keys: torch.Tensor, grads: torch.Tensor, module: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo keys, value shifts) for the tokens of one module; inputs (n, d_ff), (n, d_model)."""
        x = self.features(keys, grads)
        idx = torch.full((x.shape[0],), module, dtype=torch.long, device=x.device)
        base = x
        for block in self.blocks:
            x = block(x, idx)
        dk, dg = (x - base).split([self.d_ff, self.d_model], -1)
        pk = keys + dk * self.key_norm.std  # residual in the raw scale: k~ = k at initialization
        pg = grads + dg * self.grad_norm.std
        return pk, -self.log_lr[module].exp() * pg

    def delta(
        self,
        keys: torch.Tensor,
        grads: torch.Tensor,
        module: int,
        weight: torch.Tensor | None = None,
        fit_others: bool = True,
    ) -> torch.Tensor:
        """Delta (d_model, d_ff) of one module. ``weight`` (n,): HiEdit's 0/1 mask of the tokens whose
        edit chose this module. ``fit_others``: it scales their value shifts only, so the tokens of
        the other edits stay in the ridge system with target shift 0 and the module is fit to leave
        their outputs as they are (small world: efficacy 0.81 -> 0.87 against dropping those rows);
        else those rows drop out of the fit. On SmolLM2 the edits' tokens share near-equal keys
        (template words), and opposite targets on them blow the fit up (training edit loss 9 -> 18
        over 4 steps where dropping them gives 5 -> 6, docs/methods.md)."""
        pk, v = self(keys, grads, module)
        lam = self.log_lambda[module].exp()
        if weight is None:
            return ridge_delta(pk, v, lam)
        if fit_others:
            return ridge_delta(pk, v * weight[:, None], lam)
        return ridge_delta(pk, v, lam, rows=weight)


class Router(nn.Module):
    """HiEdit's high-level policy: a score per (edit, candidate module) from the edit's features."""

    def __init__(self, dim: int, n_modules: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.module_bias = nn.Parameter(torch.zeros(n_modules))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (n_edits, n_modules, dim) -> scores (n_edits, n_modules)."""
        return self.net(features)[..., 0] + self.module_bias


def top_k_mask(
    scores: torch.Tensor, k: int, sample: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-``k`` mask per row with a straight-through gradient, and log pi(selection).

    Forward: exactly 0/1. Backward: the gradient of k * softmax(scores). ``sample`` draws the
    subset (Gumbel top-k, for exploration while training) instead of taking the best ``k``."""
    probs = torch.softmax(scores, -1)
    noisy = scores
    if sample:
        u = torch.rand(scores.shape, generator=generator).to(scores.device).clamp(1e-9, 1 - 1e-9)
        noisy = scores - torch.log(-torch.log(u))
    chosen = noisy.topk(k, -1).indices
    hard = torch.zeros_like(scores).scatter(-1, chosen, 1.0)
    soft = k * probs
    log_pi = (torch.log_softmax(scores, -1) * hard).sum(-1)
    return hard + (soft - soft.detach()), log_pi  # exactly 0/1 forward


class RLEditHParams(HParams):
    """A trained hypernetwork editor (RLEdit arXiv 2502.05759 on MALMEN's network); ``layers`` are the
    candidate modules. Fields below ``checkpoint`` shape and train the networks (``lme-sim train-editor``)."""

    checkpoint: str | None = None  # trained networks; null: for world:* models, train on first use and cache
    rank: int = Field(64, gt=0)  # of the low-rank residual blocks
    n_blocks: int = Field(2, gt=0)
    init_lr: float = Field(1.0, gt=0)  # step size eta per module at the start of training
    init_lambda: float = Field(1.0, gt=0)  # ridge term lambda per module at the start of training
    train_lr: float = Field(1e-3, gt=0)  # Adam on the networks
    rollouts: int = Field(300, gt=0)  # sequences of edit batches
    rollout_batches: int = Field(10, gt=0)  # batches per sequence
    # edit steps per optimizer step (0: one per rollout). No gradient crosses a written delta, so a
    # rollout's gradient is the sum of its steps' and it may be applied in parts: long rollouts (the
    # state of a model already edited many times) at as many updates as short ones
    steps_per_update: int = Field(0, ge=0)
    edits_per_batch: int = Field(10, gt=0)
    lookback: int = Field(3, ge=0)  # reward counts the paraphrases of the last `lookback` earlier batches too
    mu: float = Field(0.5, ge=0)  # ... weighted mu^i for the batch i steps back
    locality: float = Field(1.0, ge=0)  # weight of KL(before || after) on unrelated prompts
    locality_prompts: int = Field(32, gt=0)
    # weight of sum_l ||Delta_l||_F^2 in the step loss (the L2 term on parameter shifts of RLEdit's
    # published code, reg_coef, which there is computed from shifts built without a graph and so adds
    # no gradient; here it does, docs/methods.md): keeps the written deltas from growing over long rollouts
    reg: float = Field(0.0, ge=0)
    # models without an embedded world train on a split disjoint from the edits evaluated: a file
    # (train_data; `train-editor --data` overrides it) or a named dataset (train_source, e.g.
    # counterfact-train: `lme-sim run` downloads it first, lme_sim.catalog), not both
    train_data: str | None = None
    train_source: str | None = None
    # training files: skip the first `holdout` records (validation); a separate training split needs none
    holdout: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_training_file(self):
        if self.train_data is not None and self.train_source is not None:
            raise ValueError("train_source: give train_data (a file) or train_source (a dataset), not both")
        return self

    def training_file(self) -> str | None:
        """The training file: ``train_data``, else the local file of dataset ``train_source`` (a
        :class:`~lme_sim.catalog.CatalogError` saying how to download it when absent), else None."""
        if self.train_source is None:
            return self.train_data
        from ..catalog import resolve

        return str(resolve(self.train_source))


class HiEditHParams(RLEditHParams):
    """RLEdit plus a router that picks ``top_k`` of the candidate modules per edit (arXiv 2604.11214)."""

    top_k: int | None = Field(None, gt=0)  # default: half of the candidates
    explore: bool = True  # training draws each edit's subset (Gumbel top-k) instead of taking the best
    balance: float = Field(0.0, ge=0)  # weight of a penalty on uneven module usage while training
    router_phase_lr: float = Field(1e-3, gt=0)  # Adam after the RLEdit start (train_lr trains that start)
    # the RLEdit start's step sizes times this at the hand-over; null: n_candidates / top_k (each
    # edit now writes into top_k modules, not all of them)
    handover_scale: float | None = Field(None, gt=0)
    # the tokens of edits that did not choose a module stay in its ridge fit with target shift 0
    # (true), or drop out of it (false); see HyperNet.delta
    fit_others: bool = True
    router_locality: float = Field(
        0.0, ge=0
    )  # router reward: weight of the KL on each edit's neighborhood prompts
    router_neighbors: int = Field(10, gt=0)  # ... the first this many of them (CounterFact has 10)
    # "edit": a subset per edit, from the edit's mean features; "batch": one subset for the whole
    # batch, from the mean over all its tokens (the published HiEdit code's gate), so every token of
    # the batch is fit in the same modules and fit_others does not arise
    route: Literal["edit", "batch"] = "edit"


@dataclass(frozen=True, kw_only=True)
class Routing:
    """How :func:`plan_deltas` picks the modules each edit writes into: a ``router`` choosing
    ``top_k`` of them (None: every module), by Gumbel sampling while training (``sample``, with
    ``generator``) or by its top scores, per edit or per batch (``route``); ``fit_others``: a
    module's ridge fit also keeps the rows of the edits that did not pick it."""

    router: Router | None = None
    top_k: int | None = None
    sample: bool = False
    generator: torch.Generator | None = None
    fit_others: bool = True
    route: str = "edit"


def plan_deltas(net: HyperNet, signals, layers: list[int], n_edits: int, routing: Routing = Routing()):
    """Deltas per layer from the hypernetwork; with a router also the (n_edits, n_layers) mask of
    chosen modules (straight-through) and log pi of each edit's choice (``route="batch"``: one choice
    for the batch, repeated on each of its edits)."""
    router, top_k, route = routing.router, routing.top_k, routing.route
    mask = log_pi = None
    if router is not None:
        feats = []
        for l in layers:
            f = net.features(signals.keys[l], signals.grads[l])  # (n_tokens, dim)
            if route == "batch":
                feats.append(f.mean(0, keepdim=True))
                continue
            summed = f.new_zeros(n_edits, f.shape[1]).index_add(0, signals.owner, f)
            counts = torch.bincount(signals.owner, minlength=n_edits).clamp_min(1)[:, None]
            feats.append(summed / counts)
        mask, log_pi = top_k_mask(router(torch.stack(feats, 1)), top_k, routing.sample, routing.generator)
        if route == "batch":  # (1, n_layers) -> every edit of the batch
            mask, log_pi = mask.expand(n_edits, -1), log_pi.expand(n_edits)
    deltas = {}
    for i, l in enumerate(layers):
        weight = mask[signals.owner, i] if mask is not None else None
        deltas[l] = net.delta(signals.keys[l], signals.grads[l], i, weight, routing.fit_others)
    return deltas, mask, log_pi


def build_networks(ckpt: dict) -> tuple[HyperNet, Router | None]:
    net = HyperNet(**ckpt["net_config"])
    net.load_state_dict(ckpt["net"])
    router = None
    if ckpt.get("router") is not None:
        router = Router(net.d_ff + net.d_model, ckpt["net_config"]["n_modules"])
        router.load_state_dict(ckpt["router"])
    return net.eval(), router
