"""Target vectors z for MEMIT/AlphaEdit (ROME sec. 3.1 / MEMIT eq. 16), batched over requests.

For request r, a vector delta_r is added to the output of layer L at the last subject token and
optimized with Adam so that the model predicts the new object:

    loss_r = mean_c NLL(new | context_c + prompt_r) / len(new)            (length-normalized)
           + kl_factor * KL(P_current || P_initial)   at the subject of "{subject} is a"
           + v_weight_decay * ||delta_r|| / ||h_r||^2

with early stop once loss_r < v_loss_stop and ||delta_r|| clamped to clamp_norm_factor * ||h_r||.
The requests of a batch (as many as fit ``rows_per_pass`` rows at a time) share one forward/backward
per step. Because the losses are summed and Adam is element-wise, each delta_r follows exactly the
trajectory it would follow alone; a request that has converged is frozen and its rows leave the batch.

With ``reuse`` (the default, where the backbone supports it) one pass per batch keeps what no delta
can change (positions before the subject's last token, blocks up to L; :mod:`lme_sim.suffix`) and
each step runs only blocks L+1.. on the positions from the subject's last token on: the same math
as the full passes (``reuse=False``, the reference), with less arithmetic.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..backbone import Inject, Positions, as_backbone, chunk_size
from ..cases import EditCase
from ..scoring import logits_at
from ..tokens import encode_pairs, encode_texts, subject_last_positions
from .activations import activations_at, contextual
from .hparams import TargetHParams


@dataclass
class Targets:
    z: torch.Tensor  # (n, d_model) target hidden state at layer L
    h_init: torch.Tensor  # (n, d_model) hidden state before the edit
    steps: torch.Tensor  # (n,) optimizer steps taken
    loss: torch.Tensor  # (n,) loss when stopped

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h_init


@contextmanager
def frozen(model):
    """No parameter requires grad inside the block (gradients flow only to the deltas)."""
    module = getattr(model, "model", model)  # a LocalBackbone's model; shards freeze their own
    flags = [(p, p.requires_grad) for p in module.parameters()] if hasattr(module, "parameters") else []
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def compute_targets(
    model,
    tok,
    cases: list[EditCase],
    *,
    layer: int,
    contexts: list[str],
    hp: TargetHParams,
    batched: bool = True,
    reuse: bool = True,
) -> Targets:
    """Targets for every case. Requests are optimized together, as many at a time as fit in
    ``hp.rows_per_pass`` rows (each has a row per context and a KL row): the backward keeps every
    block's activations of these rows, so this bounds memory (on SmolLM2-135M ~17 MB per row; all
    100 requests of a batch at once peaked at 12 GB in one shard). ``batched=False`` runs the same
    math one request at a time; ``reuse=False`` runs every step through the whole model (the
    reference for the suffix passes). The groups are independent (each its own passes and Adam
    steps), so a pipelined backbone runs them at once (:meth:`~lme_sim.backbone.Backbone.map_chunks`),
    cut into as many even groups as its shards need (:func:`~lme_sim.backbone.chunk_size`)."""
    model = as_backbone(model)
    per = max(1, hp.rows_per_pass // (len(contexts) + 1)) if batched else 1
    # the optimizer steps, most of the work: blocks L+1.. on the suffix passes, else every block
    steps = range(layer + 1, model.n_layers) if reuse and model.supports_suffix() else None
    per = chunk_size(len(cases), per, model.pipeline_depth(steps))
    parts = model.map_chunks(
        lambda part: _targets_of(model, tok, part, layer=layer, contexts=contexts, hp=hp, reuse=reuse),
        [cases[i : i + per] for i in range(0, len(cases), per)] or [cases],
        steps,
    )
    if len(parts) == 1:
        return parts[0]
    return Targets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("z", "h_init", "steps", "loss")))


def _targets_of(
    model, tok, cases: list[EditCase], *, layer: int, contexts: list[str], hp: TargetHParams, reuse: bool
) -> Targets:
    """:func:`compute_targets` of one group of requests, optimized together."""
    n = len(cases)
    subjects = [c.subject for c in cases]
    h_init = activations_at(
        model,
        tok,
        [c.prompt for c in cases],
        subjects,
        [layer],
        kind="hidden",
        batch_size=hp.rows_per_pass,
        early_stop=reuse,
    )[layer]
    rw = _RowBatch.build(tok, cases, contexts, hp.kl_prompt)
    delta = torch.zeros_like(h_init, requires_grad=True)
    prefix = None
    if reuse and model.supports_suffix():
        prefix, kl_logits = rw.prefix(model, layer)
        kl_init = torch.log_softmax(kl_logits, -1)
    else:
        with torch.no_grad():
            kl_init = rw.forward(model, layer, delta, torch.arange(n))[1]
    try:
        steps, final = _optimize(model, _Objective(rw, layer, prefix, h_init, kl_init), hp, delta)
    finally:
        if prefix is not None:
            model.drop_prefix(prefix)
    return Targets(z=(h_init + delta.detach()).cpu(), h_init=h_init.cpu(), steps=steps, loss=final)


@dataclass
class _Objective:
    """What every step's loss in :func:`_optimize` is computed from: the rows, the block whose
    output the shift is added to, the cached prefix of the rows (None: whole passes), and the
    unshifted hidden states and next-token log-probabilities of the KL rows."""

    rw: _RowBatch
    layer: int
    prefix: object
    h_init: torch.Tensor
    kl_init: torch.Tensor


def _optimize(
    model, obj: _Objective, hp: TargetHParams, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on ``delta`` (n, d) in place; returns each request's steps and final loss."""
    rw, layer, prefix, h_init, kl_init = obj.rw, obj.layer, obj.prefix, obj.h_init, obj.kl_init
    n = len(delta)
    steps = torch.zeros(n, dtype=torch.long)
    final = torch.zeros(n)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * h_init.norm(dim=1)
    active = torch.ones(n, dtype=torch.bool)
    with frozen(model):
        for it in range(hp.v_num_grad_steps):
            idx = active.nonzero()[:, 0]
            nll, kl_logp = rw.forward(model, layer, delta, idx, prefix)
            kl = (kl_logp.exp() * (kl_logp - kl_init[idx])).sum(-1)
            wd = hp.v_weight_decay * delta[idx].norm(dim=1) / h_init[idx].norm(dim=1) ** 2
            loss = nll + hp.kl_factor * kl + wd
            done = (loss.detach().cpu() < hp.v_loss_stop) | (it == hp.v_num_grad_steps - 1)
            final[idx] = loss.detach().float().cpu()
            steps[idx] = it
            active[idx[done]] = False
            if not active.any():
                break
            keep = delta.detach().clone()
            opt.zero_grad()
            loss[~done.to(loss.device)].sum().backward()
            opt.step()
            with torch.no_grad():
                delta[~active] = keep[~active]  # Adam momentum must not move converged requests
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
    return steps, final


@dataclass
class _RowBatch:
    """Rewrite rows (every context x every request) and one KL row per request."""

    ids: torch.Tensor
    mask: torch.Tensor
    owner: torch.Tensor  # request of each row
    subj_pos: torch.Tensor  # last subject token of each row
    is_kl: torch.Tensor
    tgt_row: torch.Tensor  # for every target token: its row, position, label
    tgt_pos: torch.Tensor
    tgt_label: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / (target length * n_contexts): sums to the mean NLL per request
    n_req: int

    @classmethod
    def build(cls, tok, cases: list[EditCase], contexts: list[str], kl_prompt: str) -> _RowBatch:
        n, n_ctx = len(cases), len(contexts)
        texts, subjects = contextual(cases, contexts)
        pairs = encode_pairs(tok, texts, [c.target_new for c in cases for _ in contexts])
        kl_texts = [kl_prompt.format(c.subject) for c in cases]
        kl_ids, kl_mask = encode_texts(tok, kl_texts)
        width = max(pairs.input_ids.shape[1], kl_ids.shape[1])
        ids = torch.full((n * n_ctx + n, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[: n * n_ctx, : pairs.input_ids.shape[1]] = pairs.input_ids
        mask[: n * n_ctx, : pairs.input_ids.shape[1]] = pairs.attention_mask
        ids[n * n_ctx :, : kl_ids.shape[1]] = kl_ids
        mask[n * n_ctx :, : kl_ids.shape[1]] = kl_mask
        rows, pos, labels = pairs.target_positions()
        weight = 1.0 / (pairs.target_len[rows].float() * n_ctx)
        return cls(
            ids=ids,
            mask=mask,
            owner=torch.cat([torch.arange(n).repeat_interleave(n_ctx), torch.arange(n)]),
            subj_pos=torch.cat(
                [
                    subject_last_positions(tok, texts, subjects),
                    subject_last_positions(tok, kl_texts, [c.subject for c in cases]),
                ]
            ),
            is_kl=torch.cat([torch.zeros(n * n_ctx, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]),
            tgt_row=rows,
            tgt_pos=pos,
            tgt_label=labels,
            tgt_weight=weight,
            n_req=n,
        )

    def prefix(self, model, layer: int):
        """The pass without gradients that keeps what no delta can change (every row); returns its
        handle and the KL rows' logits before any edit, in request order."""
        kl_rows = self.is_kl.nonzero()[:, 0]
        if (self.tgt_pos < self.subj_pos[self.tgt_row]).any():
            raise ValueError("a target token is predicted before the subject's last token")
        # causal: positions after the last one read (a row's last target token, a KL row's subject)
        # change nothing read, so they are masked out like padding
        end = self.subj_pos + 1
        end = end.scatter_reduce(0, self.tgt_row, self.tgt_pos + 1, reduce="amax")
        mask = self.mask * (torch.arange(self.mask.shape[1])[None, :] < end[:, None])
        return model.prefix(self.ids, mask, self.subj_pos, layer, Positions(kl_rows, self.subj_pos[kl_rows]))

    def forward(self, model, layer: int, delta: torch.Tensor, requests: torch.Tensor, prefix=None):
        """For the given requests: NLL (per request) and KL-row log-probs, deltas injected; with a
        ``prefix`` handle (:meth:`prefix`) only the part a delta can change runs."""
        sel = torch.isin(self.owner, requests).nonzero()[:, 0]
        local = torch.full((len(self.owner),), -1, dtype=torch.long)
        local[sel] = torch.arange(len(sel))
        req_local = torch.full((self.n_req,), -1, dtype=torch.long)
        req_local[requests] = torch.arange(len(requests))
        width = int(self.mask[sel].sum(1).max())
        ids, mask = self.ids[sel, :width], self.mask[sel, :width]
        owner, subj = self.owner[sel], self.subj_pos[sel]
        inject = Inject(layer, Positions(torch.arange(len(sel)), subj), delta[owner])

        t_keep = torch.isin(self.tgt_row, sel)
        t_rows = local[self.tgt_row[t_keep]]
        kl_rows = self.is_kl[sel].nonzero()[:, 0]
        q_rows = torch.cat([t_rows, kl_rows])
        q_pos = torch.cat([self.tgt_pos[t_keep], subj[kl_rows]])
        if prefix is None:
            logits = logits_at(model, ids, mask, Positions(q_rows, q_pos), inject=inject)
        else:  # suffix coordinates: position - the row's subject position
            logits = model.suffix_logits(prefix, sel, delta[owner], Positions(q_rows, q_pos - subj[q_rows]))
        logp = torch.log_softmax(logits, -1)
        n_t = len(t_rows)
        tok_lp = logp[:n_t].gather(1, self.tgt_label[t_keep].to(logp.device)[:, None])[:, 0]
        nll = torch.zeros(len(requests), device=logp.device).index_add(
            0, req_local[owner[t_rows]].to(logp.device), -tok_lp * self.tgt_weight[t_keep].to(logp.device)
        )
        kl_logp = logp[n_t:][torch.argsort(req_local[owner[kl_rows]]).to(logp.device)]
        return nll, kl_logp
