"""Keys (W's input) and hidden states at the last subject token, batched over texts.

Keys follow ROME/MEMIT: the input of the MLP output projection W at the last subject token,
averaged over the rewrite prompt and a few short generated prefixes ("context templates"): the mean
over the groups of templates (the bare prompt, then each generated group) of each group's mean, as the
published codes average them (MEMIT's ``memit/compute_ks.py``, lines 39-49 in the copy at
SasyaTitech/NAS ``baselines/memit/compute_ks.py``; AlphaEdit's ``AlphaEdit/compute_ks.py``, the same
lines): with ``[[10, 5]]`` the bare prompt weighs 1/2 and each of the 5 prefixes 1/10.
"""

from __future__ import annotations

import torch

from ..backbone import Plan, Positions, as_backbone, chunk_size
from ..cases import EditCase
from ..scoring import generate
from ..tokens import encode_texts, subject_last_positions

STARTERS = ("The", "Therefore", "Because", "I", "You")


def context_templates(model, tok, spec: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """``["{}"]`` plus sampled prefixes "<generated text>. {}" (ROME's context templates)."""
    templates = ["{}"]
    gen = torch.Generator().manual_seed(seed)
    for length, count in spec:
        if count <= 0:
            continue
        starters = [STARTERS[i % len(STARTERS)] for i in range(count)]
        texts = generate(model, tok, starters, max_new_tokens=length, top_k=5, generator=gen)
        for s, t in zip(starters, texts):
            templates.append(f"{s} {t.strip()}".replace("{", " ").replace("}", " ") + ". {}")
    return templates


def context_groups(spec: list[tuple[int, int]]) -> list[int]:
    """The sizes of the groups :func:`context_templates` makes of ``spec``: the bare prompt, then each
    ``(length, count)`` with a count."""
    return [1] + [count for _, count in spec if count > 0]


def group_weights(groups: list[int]) -> torch.Tensor:
    """Per template, its weight in the mean of the groups' means: 1 / (groups x its group's size)."""
    return torch.tensor([1.0 / (len(groups) * n) for n in groups for _ in range(n)])


def contextual(cases: list[EditCase], contexts: list[str]) -> tuple[list[str], list[str]]:
    """Texts (case-major: every context of case 0, then case 1, ...) and their subjects."""
    texts = [ctx.format(c.prompt) for c in cases for ctx in contexts]
    subjects = [c.subject for c in cases for _ in contexts]
    return texts, subjects


@torch.no_grad()
def activations_at(
    model,
    tok,
    texts: list[str],
    subjects: list[str],
    layers: list[int],
    *,
    kind: str,
    batch_size: int = 64,
    early_stop: bool = True,
) -> dict[int, torch.Tensor]:
    """At the last subject token of each text: W's input (``kind="key"``) or the block's output
    hidden state (``kind="hidden"``), for each layer; (N, dim) float32 each, on CPU. With
    ``early_stop`` the passes end after the last of ``layers`` (later blocks cannot change them). The
    passes read nothing of each other: a pipelined backbone runs them at once
    (:meth:`~lme_sim.backbone.Backbone.map_chunks`)."""
    if kind not in ("key", "hidden"):
        raise ValueError(f"kind must be 'key' or 'hidden', not {kind!r}")
    backbone = as_backbone(model)
    pos = subject_last_positions(tok, texts, subjects)
    blocks = range(max(layers) + 1) if early_stop else None
    per = chunk_size(len(texts), batch_size, backbone.pipeline_depth(blocks))

    @torch.no_grad()  # on the pipeline's threads too (grad mode is per thread)
    def read(s: int) -> dict[int, torch.Tensor]:
        ids, mask = encode_texts(tok, texts[s : s + per])
        at = Positions(torch.arange(ids.shape[0]), pos[s : s + per])
        plan = Plan(keys={l: at for l in layers}) if kind == "key" else Plan(hidden={l: at for l in layers})
        plan.stop = max(layers) if early_stop else None
        res = backbone.run(ids, mask, plan)
        got = res.keys if kind == "key" else res.hidden
        return {l: got[l].cpu() for l in layers}

    parts = backbone.map_chunks(read, range(0, len(texts), per), blocks)
    return {l: torch.cat([p[l] for p in parts]) for l in layers}


def compute_keys(
    model,
    tok,
    cases: list[EditCase],
    layers: list[int],
    contexts: list[str],
    *,
    groups: list[int] | None = None,
    batch_size: int = 64,
    early_stop: bool = True,
) -> dict[int, torch.Tensor]:
    """K per layer: (n_cases, d_ff), each key the mean over ``groups`` (the sizes of consecutive groups
    of ``contexts``, :func:`context_groups`; None: one group) of its group's mean."""
    w = group_weights(groups or [len(contexts)])
    if len(w) != len(contexts):
        raise ValueError(f"context groups {groups} do not add up to the {len(contexts)} contexts")
    texts, subjects = contextual(cases, contexts)
    acts = activations_at(
        model, tok, texts, subjects, layers, kind="key", batch_size=batch_size, early_stop=early_stop
    )
    return {
        l: torch.einsum("ncd,c->nd", a.view(len(cases), len(contexts), -1), w.to(a.dtype))
        for l, a in acts.items()
    }
