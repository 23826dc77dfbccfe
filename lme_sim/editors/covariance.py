"""Second moment of preserved keys, C0 = E[k k^T] over the tokens of generic text (MEMIT eq. 14),
and AlphaEdit's null-space projector derived from it.

Streamed in batches over a corpus (no key list is kept; each shard sums k k^T for its own
layers in float32 per batch, float64 across batches, on its own device, and hands over the sums
once at the end). C0 and the projectors are cached on disk (``$LME_SIM_CACHE``: shared storage
on a cluster) per model weights, layer and corpus, so that each is computed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbone import as_backbone
from ..models import LoadedModel
from ..paths import cache_root
from .hparams import StatsHParams

log = logging.getLogger(__name__)


def corpus_texts(stats: StatsHParams, world=None) -> list[str]:
    """The generic texts named by ``stats``: the world's sentences, a local file, a hub dataset, or
    the true facts of a named CounterFact dataset (``cases``: its corpus file, built on first use)."""
    if stats.kind == "cases":
        stats = _as_file(stats)
    if stats.kind == "world":
        if world is None:
            raise ValueError("stats.kind 'world' needs a world:* model")
        texts = world.corpus()
    elif stats.kind == "file":
        if not stats.path or not Path(stats.path).is_file():
            raise FileNotFoundError(f"stats.path: text file {stats.path!r} not found")
        raw = Path(stats.path).read_text()
        texts = (
            json.loads(raw) if stats.path.endswith(".json") else [l for l in raw.splitlines() if l.strip()]
        )
    elif stats.kind == "hub":
        import datasets

        ds = datasets.load_dataset(stats.hub_id, stats.hub_config, split=stats.split)
        texts = [t for t in ds[stats.text_field][: stats.n_samples * 2] if t.strip()]
    else:
        raise ValueError(f"stats.kind: unknown corpus kind {stats.kind!r} (world, file, hub, cases)")
    return texts[: stats.n_samples]


@torch.no_grad()
def second_moment(
    model,
    tok,
    layers: list[int],
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """E[k k^T] of W's input over every non-padding token of ``texts``, per layer (float64)."""

    def batches():
        for s in tqdm(
            range(0, len(texts), batch_size), desc="key statistics", disable=not progress, unit="batch"
        ):
            enc = tok(
                texts[s : s + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            yield enc["input_ids"], enc["attention_mask"]

    sums, count = as_backbone(model).key_moment_sums(batches(), list(layers))
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


def stats_folder(model, layers: list[int], stats: StatsHParams) -> Path:
    """Where C0 and the projectors of these weights and this corpus are cached."""
    return cache_root() / "stats" / f"{weights_fingerprint(model, layers)}-{_corpus_key(stats)}"


def cached_second_moment(
    lm: LoadedModel,
    layers: list[int],
    stats: StatsHParams,
    *,
    progress: bool = True,
    folder: Path | None = None,
) -> dict[int, torch.Tensor]:
    """C0 per layer of ``lm.model`` (a model or a backbone), from the disk cache where present, else
    computed (over ``stats``' corpus; ``world:*``: the world's sentences) and cached."""
    folder = folder or stats_folder(lm.model, layers, stats)
    paths = {l: folder / f"layer{l}.pt" for l in layers}
    missing = [l for l in layers if not paths[l].exists()]
    out = {l: torch.load(paths[l]) for l in layers if l not in missing}
    if missing:
        texts = corpus_texts(stats, lm.world)
        log.info("computing key statistics for layers %s over %d texts", missing, len(texts))
        fresh = second_moment(
            lm.model, lm.tok, missing, texts, max_length=stats.max_length, progress=progress
        )
        for l, c in fresh.items():
            _save(c, paths[l])
        out.update(fresh)
    return out


def cached_projectors(
    lm: LoadedModel, layers: list[int], stats: StatsHParams, threshold: float, *, progress: bool = True
) -> dict[int, torch.Tensor]:
    """AlphaEdit's null-space projector per layer, from the disk cache where present, else computed
    from C0 by whoever holds the layer (the shard, on its GPU) and cached beside C0."""
    backbone = as_backbone(lm.model)
    folder = stats_folder(backbone, layers, stats)
    paths = {l: folder / f"layer{l}-nullspace-{threshold:g}.pt" for l in layers}
    missing = [l for l in layers if not paths[l].exists()]
    out = {l: torch.load(paths[l]) for l in layers if l not in missing}
    if missing:
        C0 = cached_second_moment(
            replace(lm, model=backbone), layers, stats, progress=progress, folder=folder
        )
        for l in tqdm(missing, desc="null-space projectors", disable=not progress, unit="layer"):
            out[l] = backbone.nullspace_projector(l, C0.pop(l), threshold)
            _save(out[l], paths[l])
    return out


def _save(tensor: torch.Tensor, path: Path) -> None:
    """Write atomically (a reader on another node never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(tensor, tmp)
    tmp.rename(path)


def _as_file(stats: StatsHParams) -> StatsHParams:
    """``cases`` statistics as the ``file`` statistics of the dataset's cached corpus file."""
    from ..corpus import cached_corpus

    path = cached_corpus(stats.source or "")
    return stats.model_copy(update={"kind": "file", "path": str(path), "source": None})


def _corpus_key(stats: StatsHParams) -> str:
    """Names the corpus by content: a local file is identified by its bytes, not its path (a named
    dataset's corpus by its corpus file's bytes, so the key equals that of the same file named by path)."""
    if stats.kind == "cases":
        stats = _as_file(stats)
    ident = stats.model_dump()
    ident.pop("source")  # not part of the keys made before the field existed (always None here)
    if stats.kind == "file" and stats.path and Path(stats.path).is_file():
        ident["path"] = hashlib.sha256(Path(stats.path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
