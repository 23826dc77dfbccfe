"""AlphaEdit on the real SmolLM2-135M with 100 CounterFact cases (10 batches x 10). Slow: run with
``make test-slow``. Key statistics come from CounterFact's *train* split text (the edit cases are
from the disjoint edit split), since no text corpus can be downloaded here."""

import time

import pytest

from lme_sim.editors import make_editor
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel
from lme_sim.paths import cache_root

from .conftest import shared_file

pytestmark = pytest.mark.slow


def counterfact_train_corpus(n_records: int = 3000):
    """Generic sentences (true facts and their paraphrases) from the CounterFact train split, as
    ``lme-sim corpus --from counterfact-train.json --records 3000`` writes them."""
    from lme_sim.corpus import write_corpus

    path = cache_root() / "corpora" / f"counterfact-train-{n_records}.txt"
    if not path.exists():
        write_corpus(shared_file("counterfact-train.json"), path, n_records)
    return path


def test_alphaedit_smollm2_counterfact_100():
    from lme_sim.data import load_counterfact
    from lme_sim.models import load_model

    cases = load_counterfact(shared_file("counterfact-edit.json"), limit=100)
    lm = load_model("smollm2-135m")
    before = summarize(case_metrics(lm.model, lm.tok, cases))
    t0 = time.time()
    editor = make_editor(
        "alphaedit",
        LoadedModel("smollm2-135m", lm.model, lm.tok),
        overrides={"stats": {"kind": "file", "path": str(counterfact_train_corpus()), "n_samples": 6000}},
    )
    t_init = time.time() - t0
    timings = []
    for i in range(0, 100, 10):
        result = editor.edit(cases[i : i + 10])
        timings.append(result.timings)
        print(
            f"batch {i // 10}: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), flush=True
        )
    after = summarize(case_metrics(lm.model, lm.tok, cases))
    print(
        f"\nSmolLM2-135M, AlphaEdit, 100 CounterFact edits (10 x 10); set-up {t_init:.0f} s, "
        f"editing {sum(sum(t.values()) for t in timings):.0f} s"
    )
    for k in ("efficacy", "generalization", "specificity"):
        print(f"  {k:15s} before {before[k]:.3f}  after {after[k]:.3f}")
    assert after["efficacy"] >= 0.9
    assert after["generalization"] > before["generalization"]
