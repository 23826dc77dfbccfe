"""A plain-text corpus of generic sentences from a local CounterFact file, for key statistics.

AlphaEdit's null-space projector and MEMIT's covariance need the second moment of an edited
layer's keys over "generic" text (the papers use Wikipedia). Where no corpus can be downloaded,
the true facts of a CounterFact split *disjoint from the edits* stand in: per case, its prompt and
every paraphrase completed with the true object, one sentence per line. ``lme-sim corpus`` writes
that file; a scenario then names it: ``editor.hparams.stats: {kind: file, path: <file>, n_samples: N}``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .cases import EditCase
from .data import load_counterfact


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
