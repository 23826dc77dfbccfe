"""One RLEdit / HiEdit training rollout, timed with the blocks below the lowest candidate run once per
rollout (``start`` = that block) and with whole passes (``start`` 0), one after the other in one
process, from the same untrained networks on the same edits (the same math: see
``tests/test_learned_editors.py::test_a_rollout_from_the_cached_lower_blocks_equals_whole_passes``).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/rollout_speed.py \\
        --layers 22-27 --hparams '{lookback: 3}'
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import yaml

from lme_sim.arch import weight_view
from lme_sim.data import load_cases
from lme_sim.editors.editor_training import _NextToken, _Rollout, _Trainer
from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.hypernet import HyperNet, Router
from lme_sim.editors.targets import frozen
from lme_sim.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rledit", choices=["rledit", "hiedit"])
    ap.add_argument("--layers", default=None, help="e.g. 22-27 (default: the hparams' layers)")
    ap.add_argument("--hparams", default="{}", help="YAML mapping on top of the method's defaults")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = yaml.safe_load(args.hparams) or {}
    if args.layers:
        a, b = map(int, args.layers.split("-"))
        extra["layers"] = list(range(a, b + 1))
    hp = load_hparams(args.method, args.model, extra)
    lm = load_model(args.model, progress=False)
    model, tok, layers = lm.model, lm.tok, list(hp.layers)
    n = hp.rollout_batches * hp.edits_per_batch
    cases = load_cases(args.data)[:n]
    batches = [cases[i : i + hp.edits_per_batch] for i in range(0, n, hp.edits_per_batch)]
    loc = random.Random(0).sample([p for c in cases for p, _ in c.neighborhood], hp.locality_prompts)
    d_model, d_ff = weight_view(model, layers[0]).shape
    original = {l: weight_view(model, l).detach().clone() for l in layers}
    for start in (min(layers), 0):
        torch.manual_seed(0)
        net = HyperNet(
            d_ff,
            d_model,
            len(layers),
            rank=hp.rank,
            n_blocks=hp.n_blocks,
            init_lr=hp.init_lr,
            init_lambda=hp.init_lambda,
        )
        router = Router(d_ff + d_model, len(layers)) if args.method == "hiedit" else None
        top_k = (getattr(hp, "top_k", None) or max(1, len(layers) // 2)) if router else None
        trainer = _Trainer(model, tok, net, router, top_k, hp, torch.Generator().manual_seed(0))
        trainer.start = start
        neighbors = hp.router_neighbors if router is not None and hp.router_locality else 0
        with frozen(model):
            t0 = time.perf_counter()
            rows = _Rollout.prepare(model, tok, batches, loc, start, neighbors)
            unrelated = _NextToken(model, rows.unrelated)
            prepare = time.perf_counter() - t0
            steps = []
            for t in range(len(batches)):
                s = time.perf_counter()
                trainer.step(batches, rows, unrelated, t)
                steps.append(round(time.perf_counter() - s, 2))
            total = time.perf_counter() - t0
        for l in layers:
            weight_view(model, l).data.copy_(original[l])
        row = {"method": args.method, "layers": layers, "lookback": hp.lookback, "start": start}
        row.update({"prepare_s": round(prepare, 2), "steps_s": steps, "rollout_s": round(total, 1)})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
