"""Time per edit of target-vector optimization: batched over requests vs one request at a time.

Same math and stopping rule in both (see lme_sim.editors.targets); the script also checks that
the two give the same targets. Default: SmolLM2-135M, 32 CounterFact edits, AlphaEdit's
SmolLM2 hyperparameters. Writes a JSON result next to this file (benchmarks/results/).

    .venv/bin/python benchmarks/target_batching.py [--n-edits 32] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lme_sim.data import load_counterfact
from lme_sim.editors.activations import context_templates
from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.targets import compute_targets
from lme_sim.models import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-edit.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA), help="CounterFact JSON (flat or nested)")
    ap.add_argument("--n-edits", type=int, default=32)
    ap.add_argument("--method", default="alphaedit", help="whose hyperparameters to use")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    lm = load_model(args.model)
    cases = load_counterfact(args.data, limit=args.n_edits)
    hp = load_hparams(args.method, args.model)
    layer = hp.layers[-1]
    contexts = context_templates(lm.model, lm.tok, hp.context_templates)
    runs = {}
    for mode, batched in (("batched", True), ("one_at_a_time", False)):
        t0 = time.perf_counter()
        targets = compute_targets(
            lm.model, lm.tok, cases, layer=layer, contexts=contexts, hp=hp, batched=batched
        )
        seconds = time.perf_counter() - t0
        runs[mode] = {"seconds": seconds, "seconds_per_edit": seconds / len(cases), "targets": targets}
        print(
            f"{mode:14s} {seconds:8.1f} s  {seconds / len(cases):6.2f} s/edit  "
            f"mean steps {targets.steps.float().mean():.1f}",
            flush=True,
        )
    a, b = runs["batched"]["targets"], runs["one_at_a_time"]["targets"]
    rel = ((a.z - b.z).norm(dim=1) / b.delta.norm(dim=1).clamp_min(1e-12)).max().item()
    speedup = runs["one_at_a_time"]["seconds"] / runs["batched"]["seconds"]
    print(
        f"speed-up {speedup:.2f}x; max relative difference of the target deltas {rel:.2e}; "
        f"identical step counts: {bool(torch.equal(a.steps, b.steps))}"
    )
    result = {
        "benchmark": "target_batching",
        "model": args.model,
        "n_edits": len(cases),
        "method_hparams": args.method,
        "layer": layer,
        "n_contexts": len(contexts),
        "v_num_grad_steps": hp.v_num_grad_steps,
        "batched_s_per_edit": runs["batched"]["seconds_per_edit"],
        "one_at_a_time_s_per_edit": runs["one_at_a_time"]["seconds_per_edit"],
        "speedup": speedup,
        "max_rel_target_difference": rel,
        "same_steps": bool(torch.equal(a.steps, b.steps)),
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"target_batching-{args.model.replace('/', '_')}-{len(cases)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
