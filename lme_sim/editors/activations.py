"""Keys (W's input) and hidden states at the last subject token, batched over texts.

Keys follow ROME/MEMIT: the input of the MLP output projection W at the last subject token,
averaged over the rewrite prompt and a few short generated prefixes ("context templates").
"""

from __future__ import annotations

import torch

from ..arch import edit_module_path, layer_path
from ..cases import EditCase
from ..hooks import capture_inputs, capture_outputs
from ..tokens import encode_texts, subject_last_positions

STARTERS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def context_templates(model, tok, spec: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """``["{}"]`` plus sampled prefixes "<generated text>. {}" (ROME's context templates)."""

    templates = ["{}"]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for length, count in spec:
                if count <= 0:
                    continue
                starters = [STARTERS[i % len(STARTERS)] for i in range(count)]
                enc = tok(starters, return_tensors="pt", padding=True).to(model.device)
                gen = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length,
                                     pad_token_id=tok.pad_token_id, eos_token_id=None)
                texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for s, t in zip(starters, texts):
                    text = f"{s} {t.strip()}".replace("{", " ").replace("}", " ")
                    templates.append(text + ". {}")
    finally:
        tok.padding_side = side
    return templates


def contextual(cases: list[EditCase], contexts: list[str]) -> tuple[list[str], list[str]]:
    """Texts (case-major: every context of case 0, then case 1, ...) and their subjects."""
    texts = [ctx.format(c.prompt) for c in cases for ctx in contexts]
    subjects = [c.subject for c in cases for _ in contexts]
    return texts, subjects


@torch.no_grad()
def activations_at(model, tok, texts: list[str], subjects: list[str], layers: list[int], *,
                   kind: str, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """At the last subject token of each text: W's input (``kind="key"``) or the block's output
    hidden state (``kind="hidden"``), for each layer; (N, dim) float32 each."""
    if kind == "key":
        modules, capture = {l: model.get_submodule(edit_module_path(model, l)) for l in layers}, capture_inputs
    elif kind == "hidden":
        modules, capture = {l: model.get_submodule(layer_path(model, l)) for l in layers}, capture_outputs
    else:
        raise ValueError(f"kind must be 'key' or 'hidden', not {kind!r}")
    pos = subject_last_positions(tok, texts, subjects)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for s in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tok, texts[s:s + batch_size])
        with capture(modules) as seen:
            model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        rows = torch.arange(ids.shape[0])
        for l in layers:
            out[l].append(seen[l][0][rows, pos[s:s + batch_size].to(seen[l][0].device)].float().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def compute_keys(model, tok, cases: list[EditCase], layers: list[int], contexts: list[str],
                 batch_size: int = 64) -> dict[int, torch.Tensor]:
    """K per layer: (n_cases, d_ff), each key averaged over the context templates."""
    texts, subjects = contextual(cases, contexts)
    acts = activations_at(model, tok, texts, subjects, layers, kind="key", batch_size=batch_size)
    return {l: a.view(len(cases), len(contexts), -1).mean(1) for l, a in acts.items()}
