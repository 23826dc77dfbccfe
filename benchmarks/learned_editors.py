"""RLEdit / HiEdit checkpoints (and any other editor) on held-out streams of sequential edits.

Each (stream, editor) edits a fresh copy of the model with the stream's records in batches of
``--batch``, then scores every edit of the stream (:func:`lme_sim.metrics.case_metrics`) and the
general-ability set (:func:`lme_sim.general_ability.mc_accuracy`). Streams are slices of ``--data``
(``start:stop``). For a learned editor it also reports the modules touched per edit and, for HiEdit,
how varied the router's choices are (distinct subsets over the stream, and the share of the most
common one). One JSON line per (stream, editor) on stdout (and ``--out``).

The budget curve of issue 19 (snapshots of one training run, validated on records the training skipped):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/learned_editors.py \\
        --data ../shared/data/counterfact-train.json --stream 0:100 --stream 100:200 \\
        --editor rledit=PATH-r15.pt --editor rledit=PATH.pt

The held-out evaluation (CounterFact's edit split, 3 streams of 500 edits in batches of 10):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/learned_editors.py \\
        --stream 0:500 --stream 500:1000 --stream 1000:1500 --editor rledit --editor hiedit

``--editor METHOD`` uses the method's defaults for the model (for RLEdit/HiEdit: the cached
networks); ``METHOD=CHECKPOINT`` a given checkpoint; ``--hparams METHOD=YAML`` overrides fields, e.g.
AlphaEdit's key statistics from the local corpus (``lme-sim corpus``) instead of the hub:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/learned_editors.py --stream 0:500 --editor alphaedit \\
        --hparams "alphaedit={stats: {kind: file, path: runs/corpus/counterfact-train.txt, n_samples: 20000}}"
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from lme_sim.data import load_cases
from lme_sim.editors import make_editor
from lme_sim.editors.checkpoints import load_checkpoint
from lme_sim.general_ability import mc_accuracy, probe_items
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel, load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-edit.json"
KEYS = ("efficacy", "generalization", "specificity")


def router_variety(touched: list[list[str]]) -> dict:
    """Distinct module subsets chosen over the edits, and the share of the most common one."""
    subsets = collections.Counter(tuple(sorted(t)) for t in touched)
    return {
        "distinct_subsets": len(subsets),
        "top_subset_share": round(subsets.most_common(1)[0][1] / len(touched), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--stream", action="append", required=True, help="start:stop records of --data")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--editor", action="append", required=True, help="METHOD or METHOD=CHECKPOINT")
    ap.add_argument(
        "--hparams",
        action="append",
        default=[],
        help="METHOD=YAML mapping on top of the method's defaults, e.g. "
        "alphaedit='{stats: {kind: file, path: runs/corpus/counterfact-train.txt}}'",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extra = {m: yaml.safe_load(text) for m, _, text in (h.partition("=") for h in args.hparams)}

    lm = load_model(args.model, progress=False)
    records = load_cases(args.data)
    items = probe_items(100, None, lm.world)

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    def scores(model, cases) -> dict:
        s = summarize(case_metrics(model, lm.tok, cases))
        out = {k: round(s[k], 4) for k in KEYS}
        out["mean"] = round(sum(s[k] for k in KEYS) / 3, 4)
        out["general_ability"] = round(mc_accuracy(model, lm.tok, items), 4)
        return out

    for text in args.stream:
        a, b = map(int, text.split(":"))
        cases = records[a:b]
        common = {"data": Path(args.data).name, "stream": text, "batch": args.batch, "threads": args.threads}
        if not args.no_baseline:
            emit({**common, "editor": "unedited", **scores(lm.model, cases)})
        for spec in args.editor:
            method, _, ckpt = spec.partition("=")
            model = copy.deepcopy(lm.model)
            over = dict(extra.get(method) or {})
            if ckpt:  # the checkpoint's own candidate modules
                over.update(checkpoint=ckpt, layers=load_checkpoint(ckpt, method)["layers"])
            editor = make_editor(
                method, LoadedModel(args.model, model, lm.tok), overrides=over, progress=False
            )
            t0 = time.perf_counter()
            touched, per_edit = [], []
            for i in tqdm(range(0, len(cases), args.batch), desc=f"{spec} on {text}", unit="batch"):
                r = editor.edit(cases[i : i + args.batch])
                touched += r.touched or []
                if "modules_per_edit" in r.stats:
                    per_edit.append(r.stats["modules_per_edit"])
            edit_s = time.perf_counter() - t0
            row = {
                **common,
                "editor": spec,
                **scores(model, cases),
                "edit_s_per_edit": round(edit_s / len(cases), 4),
            }
            if per_edit:
                row["modules_per_edit"] = round(sum(per_edit) / len(per_edit), 3)
                row["n_candidates"] = len(editor.hp.layers)
            if touched and getattr(editor, "router", None) is not None:
                row.update(router_variety(touched))
            emit(row)


if __name__ == "__main__":
    main()
