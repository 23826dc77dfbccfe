"""Batched teacher-forced scoring: log P(target tokens | prompt) for many pairs per forward pass,
and batched greedy / sampled generation.

Rows are sorted by length and chunked, the vocabulary projection is applied only at the
positions that predict target tokens (not at every position), and padding never leaks into a
score: scores equal one-at-a-time scoring (tested to 1e-4). Everything runs through a
:class:`~lme_sim.backbone.Backbone`, so it works on an in-process model and on shards alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Inject, Plan, Positions, as_backbone
from .tokens import PairBatch, _pad, encode_pairs


@dataclass
class TargetScores:
    mean_logprob: torch.Tensor  # (N,) mean per-token log P(target | prompt)
    sum_logprob: torch.Tensor  # (N,)
    token_acc: torch.Tensor  # (N,) fraction of target tokens that are the argmax (teacher forcing)
    n_tokens: torch.Tensor  # (N,)


class PairScorer:
    """A scoring engine outside torch (the vLLM backend): scores pair batches and generates greedily.
    :func:`score_pairs` and :func:`generate` hand such an engine the same token ids they would
    run through a backbone, so both backends see identical inputs."""

    def score_pairs(self, batch: PairBatch) -> TargetScores:
        raise NotImplementedError

    def greedy_ids(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor, inject: Inject | None = None,
              rotate: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token logits at (rows, pos) only: the backbone runs once, the head on M positions."""
    plan = Plan(logits=Positions(rows, pos), inject=inject, rotate=rotate or {})
    return as_backbone(model).run(input_ids, attention_mask, plan).logits


def target_logprobs(model, batch: PairBatch, rotate: dict[int, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per target token: (row, log P(label), label is argmax) for a batch of pairs (``rotate``: see
    :class:`~lme_sim.backbone.Plan`)."""
    rows, pos, labels = batch.target_positions()
    logp = torch.log_softmax(logits_at(model, batch.input_ids, batch.attention_mask, rows, pos, rotate=rotate), -1)
    labels = labels.to(logp.device)
    return rows, logp.gather(1, labels[:, None])[:, 0], logp.argmax(-1) == labels


@torch.no_grad()
def score_pairs(model, batch: PairBatch, batch_size: int = 64) -> TargetScores:
    if isinstance(model, PairScorer):
        return model.score_pairs(batch)
    n = len(batch)
    total = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    order = torch.argsort(batch.prompt_len + batch.target_len)
    for chunk in order.split(batch_size):
        rows, lp, ok = target_logprobs(model, batch.select(chunk))
        idx = chunk[rows.cpu()]
        total.index_add_(0, idx, lp.double().cpu())
        hits.index_add_(0, idx, ok.double().cpu())
    n_tok = batch.target_len.double()
    return TargetScores(total / n_tok, total, hits / n_tok, batch.target_len)


def score_targets(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> TargetScores:
    """Score ``len(prompts)`` (prompt, target) pairs in ``ceil(N / batch_size)`` forward passes."""
    if not prompts:
        empty = torch.zeros(0, dtype=torch.float64)
        return TargetScores(empty, empty, empty, torch.zeros(0, dtype=torch.long))
    return score_pairs(model, encode_pairs(tok, prompts, targets), batch_size)


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 32,
             top_k: int | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Continuations of many prompts: greedy, or sampled from the top ``top_k`` tokens.

    Rows are right-padded and every row grows at its own end (no KV cache: each step is one
    batched forward pass), so the same code runs on any backbone, shards included.
    """
    if isinstance(model, PairScorer):
        if top_k is not None:
            raise ValueError("a PairScorer generates greedily only")
        ids = tok(list(prompts))["input_ids"]
        return tok.batch_decode(model.greedy_ids(ids, max_new_tokens), skip_special_tokens=True)
    backbone = as_backbone(model)
    out: list[str] = []
    limit = _max_positions(model)
    for s in range(0, len(prompts), batch_size):
        seqs = tok(prompts[s:s + batch_size])["input_ids"]
        start = [len(q) for q in seqs]
        for _ in range(max_new_tokens):
            if max(len(q) for q in seqs) >= limit:
                break
            ids, mask = _pad(seqs, tok.pad_token_id)
            lengths = mask.sum(1)
            logits = logits_at(backbone, ids, mask, torch.arange(len(seqs)), lengths - 1)
            if top_k is None:
                nxt = logits.argmax(-1)
            else:
                vals, idx = logits.topk(top_k, -1)
                pick = torch.multinomial(torch.softmax(vals.cpu(), -1), 1, generator=generator)[:, 0]
                nxt = idx.cpu()[torch.arange(len(seqs)), pick]
            seqs = [q + [int(t)] for q, t in zip(seqs, nxt.tolist())]
        out += tok.batch_decode([q[b:] for q, b in zip(seqs, start)], skip_special_tokens=True)
    return out


def greedy_generate(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    return generate(model, tok, prompts, max_new_tokens, batch_size)


def _max_positions(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1 << 30
