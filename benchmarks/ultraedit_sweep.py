"""UltraEdit's efficacy / specificity trade-off over lr and layers (choose hyperparameters on TRAIN data).

Each setting edits a fresh copy of the model with the first ``--n`` records of ``--data`` in
sequential batches of ``--batch`` and scores every edit of the run afterwards
(:func:`lme_sim.metrics.case_metrics`). One JSON line per setting on stdout (and ``--out``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ultraedit_sweep.py --n 200 \\
        --setting 26-27:1e-3 --setting 22-27:3e-4 [--data .../counterfact-train.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lme_sim.data import load_counterfact
from lme_sim.editors import make_editor
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel, load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-train.json"
KEYS = ("efficacy", "generalization", "specificity")


def parse_setting(text: str) -> tuple[list[int], float]:
    """``"22-27:3e-4"`` or ``"26,27:1e-3"`` -> (layers, lr)."""
    layers, lr = text.split(":")
    if "-" in layers:
        a, b = map(int, layers.split("-"))
        return list(range(a, b + 1)), float(lr)
    return [int(x) for x in layers.split(",")], float(lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--setting", action="append", required=True, help="layers:lr, e.g. 26-27:1e-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, progress=False)
    cases = load_counterfact(args.data, limit=args.n)

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    common = {"data": Path(args.data).name, "n": args.n, "batch": args.batch}
    if not args.no_baseline:
        s = summarize(case_metrics(lm.model, lm.tok, cases))
        emit({**common, "setting": "unedited", **{k: round(s[k], 4) for k in KEYS}})
    for text in args.setting:
        layers, lr = parse_setting(text)
        model = copy.deepcopy(lm.model)
        editor = make_editor(
            "ultraedit",
            LoadedModel(args.model, model, lm.tok),
            overrides={"layers": layers, "lr": lr},
            progress=False,
        )
        t0 = time.perf_counter()
        for i in range(0, len(cases), args.batch):
            editor.edit(cases[i : i + args.batch])
        edit_s = time.perf_counter() - t0
        s = summarize(case_metrics(model, lm.tok, cases))
        emit(
            {
                **common,
                "setting": text,
                "layers": layers,
                "lr": lr,
                **{k: round(s[k], 4) for k in KEYS},
                "edit_s": round(edit_s, 1),
            }
        )
        del model, editor


if __name__ == "__main__":
    main()
