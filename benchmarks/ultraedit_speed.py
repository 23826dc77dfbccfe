"""UltraEdit edits/s on SmolLM2-135M: one batch of ``--n-edits`` CounterFact edits, in process and
over shard actors, for several chunk sizes (rows per forward/backward pass, rows sorted by length).

Times the whole ``editor.edit`` (tokenizing, the forward/backward passes, the solve, applying the
deltas): median of ``--repeats`` after one warm-up batch. Measure at one torch thread, alone:

    flock /tmp/lme-measure.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/ultraedit_speed.py [--chunks 100,25] [--shards 2] [--baseline]

``--baseline``: a plain Hugging Face forward + backward (all parameters, logits everywhere) over
the same 100 padded rows, for reference. Writes a JSON result under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lme_sim.data import load_counterfact
from lme_sim.editors import make_editor
from lme_sim.models import LoadedModel, load_model
from lme_sim.tokens import encode_pairs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-edit.json"


def time_edits(editor, cases, repeats: int) -> tuple[float, dict]:
    editor.edit(cases)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = editor.edit(cases)
        runs.append((time.perf_counter() - t0, result.timings))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def hf_baseline(model, batch) -> float:
    rows, pos, labels = batch.target_positions()
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.nn.functional.cross_entropy(logits[rows, pos], labels).backward()
    dt = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--chunks", default="100,50,25,10", help="rows per pass, comma-separated")
    ap.add_argument("--layers", default=None, help="e.g. 26,27 (default: the shipped hparams)")
    ap.add_argument("--shards", type=int, default=2, help="also over this many Ray shard actors (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, progress=False)
    cases = load_counterfact(args.data, limit=args.n_edits)
    batch = encode_pairs(lm.tok, [c.prompt for c in cases], [c.target_new for c in cases])
    real = int(batch.attention_mask.sum())
    over = {"layers": [int(x) for x in args.layers.split(",")]} if args.layers else {}
    result = {
        "model": args.model,
        "n_edits": len(cases),
        "threads": args.threads,
        "padded_width": batch.input_ids.shape[1],
        "real_tokens_per_row": real / len(cases),
        "answer_tokens": int(batch.target_len.sum()),
        "machine": platform.processor() or platform.machine(),
        "runs": [],
    }
    if args.baseline:
        hf_baseline(lm.model, batch)  # warm-up
        result["hf_forward_backward_s"] = hf_baseline(lm.model, batch)
        print(
            f"plain HF forward+backward, {len(cases)} x {batch.input_ids.shape[1]} padded tokens: "
            f"{result['hf_forward_backward_s']:.2f} s",
            flush=True,
        )

    def record(where: str, model) -> None:
        for chunk in [int(x) for x in args.chunks.split(",")]:
            editor = make_editor(
                "ultraedit",
                LoadedModel(args.model, model, lm.tok),
                overrides={**over, "rows_per_pass": chunk},
                progress=False,
            )
            seconds, timings = time_edits(editor, cases, args.repeats)
            row = {
                "where": where,
                "chunk": chunk,
                "layers": list(editor.hp.layers),
                "seconds": seconds,
                "edits_per_s": len(cases) / seconds,
                "timings": timings,
            }
            result["runs"].append(row)
            print(
                f"{where:>16s} chunk {chunk:3d}: {seconds:6.2f} s  {row['edits_per_s']:5.1f} edits/s  "
                + " ".join(f"{k} {v:.2f}" for k, v in timings.items()),
                flush=True,
            )

    record("in process", lm.model)
    if args.shards:
        from lme_sim.runtime.ray_utils import init_ray, release, start_shards
        from lme_sim.sizing import split_layers

        init_ray()
        backbone = start_shards(args.model, split_layers(lm.model.config.num_hidden_layers, args.shards))
        try:
            record(f"{args.shards} shard actors", backbone)
        finally:
            release(backbone.shards, backbone.placement_group)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ultraedit-speed-{args.model}-{len(cases)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
