"""Editing metrics as named in the CounterFact / ZsRE literature (ROME, MEMIT, AlphaEdit).

Every probe of every case is scored in one batched call (:func:`lme_sim.scoring.score_targets`):
* efficacy: P(new) > P(old) on the rewrite prompt; generalization: the same on paraphrases;
  specificity: P(true answer) > P(new) on neighborhood prompts (log P = mean per-token log prob).
* ZsRE style: teacher-forced token accuracy of the new target on the rewrite prompt
  (rewrite_acc) and paraphrases (paraphrase_acc); locality_acc on the neighborhood answers.
* fluency: n-gram entropy of generations (ROME: (2/3) H2 + (4/3) H3 in bits, x100).
* generative (WILD, arXiv 2502.11177: edits judged by what the model generates, not by teacher
  forcing): greedy continuations of the rewrite, paraphrase and neighborhood prompts;
  gen_efficacy / gen_generalization: the continuation begins with the new object;
  gen_specificity: a neighborhood continuation still begins with its true object
  (:func:`begins_with` is the comparison rule).
* retention: an edit is in force when its latest value scores above every value the fact had
  before; an edit with no earlier value (a ZsRE case without a prediction) when every token of its
  value is the model's top choice under teacher forcing (:func:`retained`), never vacuously.
* consistency needs reference text of the new object, which none of the shipped datasets has:
  it is reported as unavailable, never as a number.
"""

from __future__ import annotations

import math
from collections import Counter
from statistics import mean

import torch

from .cases import EditCase
from .scoring import TargetScores, greedy_generate, score_targets

CONSISTENCY_UNAVAILABLE = "consistency: skipped (no reference text of the new objects in this dataset)"


Probe = tuple[int, str, int]  # (case, probe kind, probe number)


def case_probes(cases: list[EditCase]) -> tuple[list[str], list[str], list[Probe]]:
    """Every (prompt, target) pair the papers' metrics read for ``cases``, and which probe each is."""
    prompts: list[str] = []
    targets: list[str] = []
    index: list[Probe] = []

    def add(i: int, kind: str, j: int, prompt: str, target: str) -> None:
        prompts.append(prompt)
        targets.append(target)
        index.append((i, kind, j))

    for i, c in enumerate(cases):
        add(i, "rw_new", 0, c.prompt, c.target_new)
        if c.target_true is not None:
            add(i, "rw_old", 0, c.prompt, c.target_true)
        for j, p in enumerate(c.paraphrases):
            add(i, "pp_new", j, p, c.target_new)
            if c.target_true is not None:
                add(i, "pp_old", j, p, c.target_true)
        for j, (p, answer) in enumerate(c.neighborhood):
            add(i, "nb_true", j, p, answer)
            add(i, "nb_new", j, p, c.target_new)
    return prompts, targets, index


def case_metrics(model, tok, cases: list[EditCase], batch_size: int = 64) -> list[dict]:
    """Per case: efficacy, generalization, specificity and the ZsRE token accuracies."""
    prompts, targets, index = case_probes(cases)
    return case_rows(cases, index, score_targets(model, tok, prompts, targets, batch_size))


def case_rows(cases: list[EditCase], index: list[Probe], s: TargetScores) -> list[dict]:
    """The per-case metrics from the scores ``s`` of the pairs :func:`case_probes` listed as ``index``."""
    lp: dict[Probe, float] = {}
    acc: dict[Probe, float] = {}
    for k, key in enumerate(index):
        lp[key], acc[key] = s.mean_logprob[k].item(), s.token_acc[k].item()

    rows = []
    for i, c in enumerate(cases):
        row: dict = {"case_id": c.case_id, "rewrite_acc": acc[(i, "rw_new", 0)]}
        if c.target_true is not None and c.target_true != c.target_new:
            row["efficacy"] = float(lp[(i, "rw_new", 0)] > lp[(i, "rw_old", 0)])
            if c.paraphrases:
                row["generalization"] = mean(
                    float(lp[(i, "pp_new", j)] > lp[(i, "pp_old", j)]) for j in range(len(c.paraphrases))
                )
        if c.paraphrases:
            row["paraphrase_acc"] = mean(acc[(i, "pp_new", j)] for j in range(len(c.paraphrases)))
        if c.neighborhood:
            n = range(len(c.neighborhood))
            row["specificity"] = mean(float(lp[(i, "nb_true", j)] > lp[(i, "nb_new", j)]) for j in n)
            row["locality_acc"] = mean(acc[(i, "nb_true", j)] for j in n)
        rows.append(row)
    return rows


# greedy tokens generated past a probe's expected object: room for the word boundary that
# :func:`begins_with` reads, and for a tokenizer that spells the object with a leading space token
GEN_EXTRA_TOKENS = 3


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space, no leading or trailing space."""
    return " ".join(text.split()).lower()


def begins_with(text: str, target: str) -> bool:
    """Whether a generated ``text`` begins with ``target``, after :func:`normalize` of both, at a word
    boundary: the next character (if any) is not a letter or digit ("Paris." and "Paris is" match
    "Paris"; "Parisian" does not). An empty target never matches."""
    t, g = normalize(target), normalize(text)
    if not t or not g.startswith(t):
        return False
    return len(g) == len(t) or not g[len(t)].isalnum()


def generation_probes(cases: list[EditCase]) -> tuple[list[str], list[str], list[Probe]]:
    """The (prompt, expected object) pairs the generative metrics read: each case's rewrite prompt and
    paraphrases with the new object, its neighborhood prompts with their true objects."""
    prompts: list[str] = []
    expected: list[str] = []
    index: list[Probe] = []
    for i, c in enumerate(cases):
        pairs = [("rw", 0, c.prompt, c.target_new)]
        pairs += [("pp", j, p, c.target_new) for j, p in enumerate(c.paraphrases)]
        pairs += [("nb", j, p, answer) for j, (p, answer) in enumerate(c.neighborhood)]
        for kind, j, prompt, target in pairs:
            prompts.append(prompt)
            expected.append(target)
            index.append((i, kind, j))
    return prompts, expected, index


def generation_rows(cases: list[EditCase], index: list[Probe], hits: list[bool]) -> list[dict]:
    """Per case: gen_efficacy, gen_generalization (mean over paraphrases), gen_specificity (mean over
    neighborhood prompts), from ``hits[k]``: :func:`begins_with` of the continuation of pair ``index[k]``
    of :func:`generation_probes`."""
    by: dict[tuple[int, str], list[float]] = {}
    for (i, kind, _), hit in zip(index, hits):
        by.setdefault((i, kind), []).append(float(hit))
    names = {"rw": "gen_efficacy", "pp": "gen_generalization", "nb": "gen_specificity"}
    return [
        {"case_id": c.case_id, **{name: mean(by[(i, k)]) for k, name in names.items() if (i, k) in by}}
        for i, c in enumerate(cases)
    ]


def generation_budget(tok, expected: list[str]) -> list[int]:
    """Tokens to generate for each probe: its expected object's token count (as it follows a prompt)
    plus :data:`GEN_EXTRA_TOKENS`."""
    ids = tok([f" {t}" for t in expected], add_special_tokens=False)["input_ids"]
    return [len(i) + GEN_EXTRA_TOKENS for i in ids]


def generation_metrics(
    model, tok, cases: list[EditCase], batch_size: int = 32
) -> tuple[list[dict], list[str], list[Probe]]:
    """:func:`generation_rows` of ``cases``: every probe prompt's greedy continuation, batched and
    KV-cached (:func:`~lme_sim.scoring.greedy_generate`; one ``generate`` call on the vLLM backend), up
    to its expected object's token count plus :data:`GEN_EXTRA_TOKENS`. Also returns the continuations
    and their probes."""
    prompts, expected, index = generation_probes(cases)
    if not prompts:
        return [], [], []
    texts = greedy_generate(model, tok, prompts, generation_budget(tok, expected), batch_size)
    hits = [begins_with(text, target) for text, target in zip(texts, expected)]
    return generation_rows(cases, index, hits), texts, index


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean of each metric over the cases that have it."""
    keys = sorted({k for r in rows for k in r if k != "case_id"})
    return {k: mean(r[k] for r in rows if k in r) for k in keys if any(k in r for r in rows)}


def retained(logprobs: torch.Tensor, token_acc: torch.Tensor) -> bool:
    """Whether a fact's latest value is in force: ``logprobs[0]`` (its mean log-prob) above every earlier
    value's ``logprobs[1:]``; with no earlier value, ``token_acc[0] == 1`` (all its tokens are the argmax)."""
    if len(logprobs) > 1:
        return bool(logprobs[0] > logprobs[1:].max())
    return bool(token_acc[0] >= 1.0)


def history_metrics(
    model, tok, cases: list[EditCase], sample: int | None = None, seed: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """The papers' metrics over the edits so far (not only the latest ones): :func:`summarize` of
    :func:`case_metrics` over ``cases``, or over ``sample`` of them drawn at random (seeded by ``seed``,
    e.g. the eval id), plus ``efficacy_n``: the number of edits efficacy was computed over."""
    import random

    if sample is not None and len(cases) > sample:
        cases = random.Random(seed).sample(list(cases), sample)
    rows = case_metrics(model, tok, cases, batch_size)
    out = summarize(rows)
    out["efficacy_n"] = float(sum("efficacy" in r for r in rows))
    return out


def retention(
    model, tok, prompts: list[str], current: list[str], history: list[list[str]], batch_size: int = 64
) -> torch.Tensor:
    """1.0 where ``current[i]`` scores above every earlier value ``history[i]`` of that fact."""
    flat_p, flat_t, owner = [], [], []
    for i, (p, cur, old) in enumerate(zip(prompts, current, history)):
        for value in [cur] + [v for v in old if v != cur]:
            flat_p.append(p)
            flat_t.append(value)
            owner.append(i)
    s = score_targets(model, tok, flat_p, flat_t, batch_size)
    owner_t = torch.tensor(owner)
    return torch.tensor(
        [
            float(retained(s.mean_logprob[owner_t == i], s.token_acc[owner_t == i]))
            for i in range(len(prompts))
        ]
    )


def n_gram_entropy(
    text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure of one text: weighted mean of its n-gram entropies (bits)."""
    words = text.split()
    ent = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, ent)) / len(ns)


def fluency(model, tok, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 32) -> float:
    """Mean n-gram entropy (x100, as reported in ROME/MEMIT tables) of greedy generations."""
    texts = greedy_generate(model, tok, prompts, max_new_tokens, batch_size)
    return 100 * mean(n_gram_entropy(f"{p} {t}") for p, t in zip(prompts, texts))
