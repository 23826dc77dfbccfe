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

from .arch import arch_of, logits_of, n_layers
from .backbone import Inject, LocalBackbone, Plan, Positions, as_backbone
from .suffix import embed, run_on_prefix, supports_suffix
from .tokens import PairBatch, _pad, encode_pairs


@dataclass
class TargetScores:
    mean_logprob: torch.Tensor  # (N,) mean per-token log P(target | prompt)
    sum_logprob: torch.Tensor  # (N,)
    token_acc: torch.Tensor  # (N,) fraction of target tokens that are the argmax (teacher forcing)
    n_tokens: torch.Tensor  # (N,)

    def __getitem__(self, rows: slice) -> TargetScores:
        return TargetScores(
            self.mean_logprob[rows], self.sum_logprob[rows], self.token_acc[rows], self.n_tokens[rows]
        )


class PairScorer:
    """A scoring engine outside torch (the vLLM backend): scores pair batches and generates greedily.
    :func:`score_pairs` and :func:`generate` hand such an engine the same token ids they would
    run through a backbone, so both backends see identical inputs."""

    def score_pairs(self, batch: PairBatch) -> TargetScores:
        raise NotImplementedError

    def greedy_ids(self, prompt_ids: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
        """Greedy continuations, ``max_new_tokens`` each (one number, or one per prompt)."""
        raise NotImplementedError


def logits_at(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    at: Positions,
    *,
    inject: Inject | None = None,
    rotate: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Next-token logits at ``at`` (M row, position pairs) only: the backbone runs once, the head on M
    positions. (M, vocab)"""
    plan = Plan(logits=at, inject=inject, rotate=rotate or {})
    return as_backbone(model).run(input_ids, attention_mask, plan).logits


def target_logprobs(
    model, batch: PairBatch, rotate: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per target token: (row, log P(label), label is argmax) for a batch of pairs (``rotate``: see
    :class:`~lme_sim.backbone.Plan`)."""
    rows, pos, labels = batch.target_positions()
    logp = torch.log_softmax(
        logits_at(model, batch.input_ids, batch.attention_mask, Positions(rows, pos), rotate=rotate), -1
    )
    labels = labels.to(logp.device)
    return rows, logp.gather(1, labels[:, None])[:, 0], logp.argmax(-1) == labels


@torch.no_grad()
def score_pairs(model, batch: PairBatch, batch_size: int = 64) -> TargetScores:
    """Scores of every pair of ``batch``, ``batch_size`` rows (distinct prompts, where their targets
    share the prompt's pass) per forward pass."""
    if isinstance(model, PairScorer):
        return model.score_pairs(batch)
    bb = as_backbone(model)
    if isinstance(bb, LocalBackbone) and supports_suffix(bb.model):
        return score_by_prompt(bb.model, batch, batch_size)
    return score_each(bb, batch, batch_size)


def score_each(model, batch: PairBatch, batch_size: int = 64) -> TargetScores:
    """One row per pair, prompt and target together: the reference for :func:`score_by_prompt`, and the
    path for sharded backbones and architectures whose blocks :mod:`lme_sim.suffix` cannot call."""
    n = len(batch)
    total = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    order = torch.argsort(batch.prompt_len + batch.target_len)
    for chunk in order.split(batch_size):
        rows, lp, ok = target_logprobs(model, batch.select(chunk))
        idx = chunk[rows.cpu()]
        total.index_add_(0, idx, lp.double().cpu())
        hits.index_add_(0, idx, ok.double().cpu())
    return _scores(batch, total, hits)


def _scores(batch: PairBatch, total: torch.Tensor, hits: torch.Tensor) -> TargetScores:
    n_tok = batch.target_len.double()
    return TargetScores(total / n_tok, total, hits / n_tok, batch.target_len)


@torch.no_grad()
def score_by_prompt(model, batch: PairBatch, batch_size: int = 64) -> TargetScores:
    """The scores of :func:`score_each`, with each distinct prompt run once for all its targets.

    With causal attention a target cannot change its prompt's hidden states, keys or values, so the
    pairs that share a prompt (a probe's new and true object, a fact's current and earlier values)
    share its pass: the prompt pass gives every target's first-token log-probs (the logits at the
    prompt's last position), and only target tokens 2.. run, as suffixes attending to their prompt's
    attention cache (:func:`lme_sim.suffix.run_on_prefix`). Per pair that is t - 1 tokens instead of
    p + t (CounterFact: p ~ 10, t ~ 1-3). ``batch_size`` distinct prompts per pass.
    """
    from transformers import DynamicCache

    dev = model.device
    n = len(batch)
    ids, p_len, t_len = batch.input_ids, batch.prompt_len, batch.target_len
    distinct: dict[tuple[int, ...], int] = {}
    owner = torch.tensor(
        [distinct.setdefault(tuple(ids[i, :p].tolist()), len(distinct)) for i, p in enumerate(p_len.tolist())]
    )
    prompts = list(distinct)
    total = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    norm = model.get_submodule(arch_of(model).final_norm)
    local = torch.full((len(prompts),), -1, dtype=torch.long)
    for chunk in torch.argsort(torch.tensor([len(p) for p in prompts])).split(batch_size):
        local[chunk] = torch.arange(len(chunk))
        pairs = (local[owner] >= 0).nonzero()[:, 0]  # the pairs whose prompt is in this chunk
        o = local[owner[pairs]]  # their prompt's row in this pass
        local[chunk] = -1
        p_ids, p_mask = _pad([list(prompts[u]) for u in chunk.tolist()], None)
        cache = DynamicCache()  # no config: a sliding-window layer keeps every position too
        out = model.base_model(
            input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), past_key_values=cache, use_cache=True
        )
        start = p_mask.sum(1)  # (b,) prompt lengths: a target's first token is at this position
        last = out.last_hidden_state[torch.arange(len(chunk), device=dev), (start - 1).to(dev)]
        logp = torch.log_softmax(logits_of(model, last), -1)  # (b, vocab): every target's first token
        first = ids[pairs, p_len[pairs]].to(dev)
        total[pairs] += logp[o.to(dev), first].double().cpu()
        hits[pairs] += (logp.argmax(-1)[o.to(dev)] == first).double().cpu()
        more = (t_len[pairs] > 1).nonzero()[:, 0]  # pairs with tokens 2.. (index into ``pairs``)
        if len(more) == 0:
            continue
        rows, o_m = pairs[more], o[more]
        length = t_len[rows] - 1  # the suffix: target tokens 1..t-1 as inputs, each predicting the next
        S = int(length.max())
        j = torch.arange(S)
        at = (p_len[rows][:, None] + j).clamp_max(ids.shape[1] - 1)  # (m, S) positions in the pair rows
        real = j[None, :] < length[:, None]
        x = torch.where(real, ids[rows[:, None], at], 0)
        labels = ids[rows[:, None], (at + 1).clamp_max(ids.shape[1] - 1)]
        pos = (start[o_m][:, None] + j).to(dev)
        h = embed(model, x.to(dev), pos)
        kv = {l: (layer.keys[o_m.to(dev)], layer.values[o_m.to(dev)]) for l, layer in enumerate(cache.layers)}
        h = run_on_prefix(model, kv, start[o_m], length, h, list(range(n_layers(model))))
        r, c = real.nonzero(as_tuple=True)
        lp = torch.log_softmax(logits_of(model, norm(h[r.to(dev), c.to(dev)])), -1)
        lab = labels[r, c].to(dev)
        total.index_add_(0, rows[r], lp.gather(1, lab[:, None])[:, 0].double().cpu())
        hits.index_add_(0, rows[r], (lp.argmax(-1) == lab).double().cpu())
    return _scores(batch, total, hits)


def score_targets(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> TargetScores:
    """Score ``len(prompts)`` (prompt, target) pairs in ``ceil(N / batch_size)`` forward passes."""
    if not prompts:
        empty = torch.zeros(0, dtype=torch.float64)
        return TargetScores(empty, empty, empty, torch.zeros(0, dtype=torch.long))
    return score_pairs(model, encode_pairs(tok, prompts, targets), batch_size)


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int | list[int] = 32,
    batch_size: int = 32,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    cache: bool | None = None,
) -> list[str]:
    """Continuations of many prompts: greedy, or sampled from the top ``top_k`` tokens.

    ``max_new_tokens``: one number for every prompt, or one per prompt (the prompts of one budget are
    batched together, so no row runs past its own; a :class:`PairScorer` takes the list in one call).

    An in-process model (an ``nn.Module`` or a :class:`~lme_sim.backbone.LocalBackbone`) generates
    with its KV cache (:func:`_generate_cached`: one pass over the prompts, then one token per row
    and step). Any other backbone (shards), or ``cache=False``, takes the reference path: rows are
    right-padded and every row grows at its own end, each step one batched forward pass over the
    whole sequences. Both give the same tokens (tests/test_scoring.py on the world model; on SmolLM2
    16 CounterFact prompts x 64 tokens, benchmarks/eval_smollm2.py, 7x faster with the cache).
    ``cache=None``: the cache for greedy generation only; sampling (the editors' context templates)
    keeps the reference path, so an editor draws the same templates in process and on shards.
    """
    if isinstance(model, PairScorer):
        if top_k is not None:
            raise ValueError("a PairScorer generates greedily only")
        ids = tok(list(prompts))["input_ids"]
        return tok.batch_decode(model.greedy_ids(ids, max_new_tokens), skip_special_tokens=True)
    if not isinstance(max_new_tokens, int):  # one budget per prompt: one group per budget
        out: list[str] = [""] * len(prompts)
        for n in sorted(set(max_new_tokens)):
            rows = [i for i, m in enumerate(max_new_tokens) if m == n]
            texts = generate(
                model,
                tok,
                [prompts[i] for i in rows],
                max_new_tokens=n,
                batch_size=batch_size,
                top_k=top_k,
                generator=generator,
                cache=cache,
            )
            for i, text in zip(rows, texts):
                out[i] = text
        return out
    backbone = as_backbone(model)
    if (top_k is None if cache is None else cache) and isinstance(backbone, LocalBackbone):
        return _generate_cached(
            backbone.model,
            tok,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            top_k=top_k,
            generator=generator,
        )
    out: list[str] = []
    limit = _max_positions(model)
    for s in range(0, len(prompts), batch_size):
        seqs = tok(prompts[s : s + batch_size])["input_ids"]
        start = [len(q) for q in seqs]
        for _ in range(max_new_tokens):
            if max(len(q) for q in seqs) >= limit:
                break
            ids, mask = _pad(seqs, tok.pad_token_id)
            lengths = mask.sum(1)
            logits = logits_at(backbone, ids, mask, Positions(torch.arange(len(seqs)), lengths - 1))
            nxt = _next_tokens(logits, top_k, generator)
            seqs = [q + [int(t)] for q, t in zip(seqs, nxt.tolist())]
        out += tok.batch_decode([q[b:] for q, b in zip(seqs, start)], skip_special_tokens=True)
    return out


def _next_tokens(logits: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The argmax of each row, or a draw from its ``top_k`` most likely tokens (on the CPU)."""
    if top_k is None:
        return logits.argmax(-1).cpu()
    vals, idx = logits.topk(top_k, -1)
    pick = torch.multinomial(torch.softmax(vals.cpu(), -1), 1, generator=generator)[:, 0]
    return idx.cpu()[torch.arange(len(pick)), pick]


def _generate_cached(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    top_k: int | None,
    generator: torch.Generator | None,
) -> list[str]:
    """:func:`generate` on an in-process Hugging Face model with its KV cache.

    Prompts are left-padded (the padding masked out and the positions counted from each row's first
    real token, so every row sees exactly what it sees alone), one pass fills the cache, then each
    step feeds one new token per row. Only the last position goes through the output head.
    """
    if not prompts:
        return []
    dev = model.device
    limit = _max_positions(model)
    encoded = tok(list(prompts))["input_ids"]
    out: list[str | None] = [None] * len(prompts)
    for s in range(0, len(prompts), batch_size):
        rows = list(range(s, min(s + batch_size, len(prompts))))
        seqs = [encoded[i] for i in rows]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, width - len(q) :] = torch.tensor(q, dtype=torch.long)
            mask[r, width - len(q) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        past, new = None, []
        for step in range(max_new_tokens):
            if width + step >= limit:
                break
            res = model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
            )
            past = res.past_key_values
            logits = logits_of(model, res.last_hidden_state[:, -1])
            nxt = _next_tokens(logits, top_k, generator)
            new.append(nxt)
            ids = nxt[:, None].to(dev)
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        gen = torch.stack(new, 1).tolist() if new else [[] for _ in rows]
        for i, g in zip(rows, tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = g
    return out


def greedy_generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int | list[int] = 32,
    batch_size: int = 32,
    cache: bool | None = None,
) -> list[str]:
    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache)


def _max_positions(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1 << 30
