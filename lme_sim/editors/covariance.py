"""Second moment of preserved keys, C0 = E[k k^T] over the tokens of generic text (MEMIT eq. 14).

Streamed in batches over a corpus (no key list is kept; each shard sums k k^T for its own
layers in float32 per batch, float64 across batches), and cached on
disk per model, layer and corpus so that each is computed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbone import Plan, as_backbone
from ..paths import cache_root
from .hparams import StatsHParams

log = logging.getLogger(__name__)


def corpus_texts(stats: StatsHParams, world=None) -> list[str]:
    """The generic texts named by ``stats``: the world's sentences, a local file, or a hub dataset."""
    if stats.kind == "world":
        if world is None:
            raise ValueError("stats.kind 'world' needs a world:* model")
        texts = world.corpus()
    elif stats.kind == "file":
        if not stats.path or not Path(stats.path).is_file():
            raise FileNotFoundError(f"stats.path: text file {stats.path!r} not found")
        raw = Path(stats.path).read_text()
        texts = json.loads(raw) if stats.path.endswith(".json") else [l for l in raw.splitlines() if l.strip()]
    elif stats.kind == "hub":
        import datasets

        ds = datasets.load_dataset(stats.hub_id, stats.hub_config, split=stats.split)
        texts = [t for t in ds[stats.text_field][: stats.n_samples * 2] if t.strip()]
    else:
        raise ValueError(f"stats.kind: unknown corpus kind {stats.kind!r} (world, file, hub)")
    return texts[: stats.n_samples]


@torch.no_grad()
def second_moment(model, tok, layers: list[int], texts: list[str], max_length: int = 128,
                  batch_size: int = 64, progress: bool = True) -> dict[int, torch.Tensor]:
    """E[k k^T] of W's input over every non-padding token of ``texts``, per layer (float64)."""
    backbone = as_backbone(model)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for s in tqdm(range(0, len(texts), batch_size), desc="key statistics", disable=not progress, unit="batch"):
        enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        res = backbone.run(enc["input_ids"], enc["attention_mask"], Plan(key_moments=list(layers)))
        count += res.n_tokens
        for l, kk in res.key_moments.items():
            sums[l] = sums[l] + kk if l in sums else kk
    return {l: v / count for l, v in sums.items()}


def weights_fingerprint(model, layers: list[int]) -> str:
    """Identifies the (unedited) weights the statistics were computed on (not the config, whose
    bookkeeping fields differ between a converted model and its saved copy)."""
    backbone = as_backbone(model)
    h = hashlib.sha256(f"{backbone.config.model_type}:{backbone.config.vocab_size}".encode())
    for l in layers:
        w = backbone.edit_weight(l).double()
        h.update(f"{l}:{w.sum().item():.10e}:{w.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def cached_second_moment(model, tok, layers: list[int], stats: StatsHParams, world=None,
                         progress: bool = True) -> dict[int, torch.Tensor]:
    """C0 per layer, from the disk cache where present, else computed and cached."""
    corpus_key = _corpus_key(stats)
    folder = cache_root() / "stats" / f"{weights_fingerprint(model, layers)}-{corpus_key}"
    paths = {l: folder / f"layer{l}.pt" for l in layers}
    missing = [l for l in layers if not paths[l].exists()]
    out = {l: torch.load(paths[l]) for l in layers if l not in missing}
    if missing:
        texts = corpus_texts(stats, world)
        log.info("computing key statistics for layers %s over %d texts", missing, len(texts))
        fresh = second_moment(model, tok, missing, texts, stats.max_length, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        for l, c in fresh.items():
            tmp = paths[l].with_suffix(".tmp")
            torch.save(c, tmp)
            tmp.rename(paths[l])
        out.update(fresh)
    return out


def _corpus_key(stats: StatsHParams) -> str:
    """Names the corpus by content: a local file is identified by its bytes, not its path."""
    ident = stats.model_dump()
    if stats.kind == "file" and stats.path and Path(stats.path).is_file():
        ident["path"] = hashlib.sha256(Path(stats.path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
