"""Cost of an evaluation on SmolLM2-135M at one torch thread: fluency generation (16 prompts x 64
tokens) with and without the KV cache, and probes/s of ``metrics.case_metrics`` over N CounterFact
cases (6 probes per flat case). Run: ``LME_SIM_CACHE=~/.cache/lme_sim python benchmarks/eval_smollm2.py
[N]`` from the repository root (with ../shared/data/counterfact-edit.json)."""

import sys
import time

import torch

from lme_sim.data import load_counterfact
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import load_model
from lme_sim.scoring import greedy_generate


def main(n_cases: int = 2000) -> None:
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m", progress=False)
    cases = load_counterfact("../shared/data/counterfact-edit.json", limit=n_cases)
    prompts = [c.prompt for c in cases[:16]]
    out = {}
    for cache in (True, False):
        if not cache:
            probes_per_second(lm, cases[:250])  # a quick figure first
        t0 = time.perf_counter()
        out[cache] = greedy_generate(lm.model, lm.tok, prompts, max_new_tokens=64, batch_size=32, cache=cache)
        print(f"fluency generation 16 x 64, cache={cache}: {time.perf_counter() - t0:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(out[True], out[False]))
    print(f"same text with and without the cache: {same} of {len(prompts)} prompts", flush=True)
    probes_per_second(lm, cases)


def probes_per_second(lm, cases) -> None:
    t0 = time.perf_counter()
    rows = case_metrics(lm.model, lm.tok, cases, batch_size=64)
    dt = time.perf_counter() - t0
    n_probes = sum(2 + 2 * len(c.paraphrases) + 2 * len(c.neighborhood) for c in cases)
    print(
        f"case_metrics: {len(cases)} cases, {n_probes} probes in {dt:.1f} s: {n_probes / dt:.0f} probes/s; "
        f"unedited {summarize(rows)}",
        flush=True,
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
