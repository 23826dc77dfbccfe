"""A plain-text corpus of generic sentences from a local CounterFact file, for key statistics.

AlphaEdit's null-space projector and MEMIT's covariance need the second moment of an edited
layer's keys over "generic" text (the papers use Wikipedia). Where no corpus can be downloaded,
the true facts of a CounterFact split *disjoint from the edits* stand in: per case, its prompt and
every paraphrase completed with the true object, one sentence per line. ``lme-sim corpus`` writes
that file; a scenario then names it: ``editor.hparams.stats: {kind: file, path: <file>, n_samples: N}``.
Or the scenario names a CounterFact dataset of the catalog (``stats: {kind: cases, source:
counterfact-train}``): its corpus file is built on first use and cached (:func:`cached_corpus`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .cases import EditCase
from .catalog import dataset, resolve, sha256_of
from .data import DataError, load_counterfact
from .paths import cache_root


def corpus_lines(cases: list[EditCase]) -> list[str]:
    """``"<prompt> <true object>."`` for the prompt and each paraphrase of every case that has a true
    object (flat CounterFact: 2 lines per case; nested: 1 + its paraphrases). Whitespace runs, line
    breaks included (some CounterFact paraphrases carry a line of preamble), become one space."""
    return [
        " ".join(f"{p} {c.target_true}.".split())
        for c in cases
        if c.target_true
        for p in (c.prompt, *c.paraphrases)
    ]


def write_corpus(source, out, records: int | None = None) -> tuple[Path, int]:
    """Sentences of the first ``records`` cases of the CounterFact file (or hub id) ``source`` into
    the text file ``out``, written atomically (a temporary file renamed over it). Returns (path, lines)."""
    lines = corpus_lines(load_counterfact(source, limit=records))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, len(lines)


def cached_corpus(source: str) -> Path:
    """The corpus file of the catalog's CounterFact dataset ``source`` (it must be downloaded: see
    :mod:`lme_sim.catalog`), written on first use under ``$LME_SIM_CACHE/corpus``, named by the
    dataset and the first bytes of its sha256 (another copy of the data gets its own file)."""
    if dataset(source).kind != "counterfact":
        raise DataError(
            f"stats.source: {source!r} is not a CounterFact dataset (its true facts make the corpus)"
        )
    data = resolve(source)
    out = cache_root() / "corpus" / f"{source}-{sha256_of(data)[:12]}.txt"
    if not out.is_file():
        write_corpus(data, out)
    return out
