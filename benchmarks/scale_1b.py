"""A 1B-scale model through the runtime on the CPU (issue 31): ``lme-sim bench``'s ``runtime`` section on
a random model of Llama-3.2-1B's shape, saved as a local folder.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_1b.py            # the 1.24B model
    PYTHONPATH=. .venv/bin/python benchmarks/scale_1b.py --shape tiny --out /tmp/s.json  # seconds

The model: a random Llama of Llama-3.2-1B's shape (``lme_sim.random_models.SHAPES``: 16 blocks of width
2048, d_ff 8192, 32 heads, 8 KV heads, vocabulary 128256, tied embeddings, RoPE theta 500000; about 1.24B
parameters), written in float32 with the embedded world's word-level tokenizer into ``--folder`` once
(5 GB; reused when it is there), so that every actor loads it by path, as a downloaded model. ``--shape
tiny``: a 4-block Llama of width 64, the same code path in seconds (tests/test_scale_1b.py).

Beside it, written once: ``cases.json``, CounterFact-shaped edits of the embedded world's facts (a random
model knows none of them; the editors' cost does not depend on it), and ``corpus.txt``, the world's
sentences, AlphaEdit's key-statistics corpus (``--corpus-sentences``). Nothing is downloaded.

Then, for each weight dtype of ``--dtypes`` (default float32, then bfloat16: 16-bit weights with float32
masters of the edited matrices on the shards and the evaluator), one UltraEdit batch of 100 and one
AlphaEdit batch of 10 on 2 shard actors and an evaluator actor (``lme_sim.bench.runtime_batch``): the
editor's phases, the deltas' bytes, each actor's resident high-water mark while starting and during the
batch, and the computed memory plan beside each (``lme_sim.sizing.memory_plan``). Printed as tables,
written as JSON to ``--out`` and as ``bench_results`` rows to ``--db``.

AlphaEdit's key statistics and projectors are cached under ``$LME_SIM_CACHE/stats`` per weights and
corpus; bfloat16 weights are other weights, so each dtype computes its own once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# layers edited per shape: UltraEdit the last blocks' MLP output (as gpu_check's 29-30 of 32), AlphaEdit
# Llama-3-8B's published 4-8 of 32 blocks scaled to 16 (3 layers: each is an 8192 x 8192 float64
# projector, covariance and pending covariance in the editor, and an 8192-wide eigendecomposition)
LAYERS = {
    "llama3.2-1b": {"ultraedit": [13, 14], "alphaedit": [2, 3, 4]},
    "tiny": {"ultraedit": [2, 3], "alphaedit": [1, 2]},
}
WORLD = "default"  # the embedded world the tokenizer, the cases and the corpus come from


def prepare(folder: Path, shape: str, n_cases: int, n_sentences: int) -> Path:
    """The model folder with its tokenizer, ``cases.json`` and ``corpus.txt``; the model is built only
    where the folder has none (``config.json``), the small files are rewritten every time."""
    from lme_sim.data import counterfact_record
    from lme_sim.random_models import save_random_model, shape_config, tiny_config
    from lme_sim.world import World, get_world_config
    from lme_sim.world_model import build_tokenizer

    world = World(get_world_config(WORLD))
    tok = build_tokenizer(world)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        config = tiny_config("llama", tok) if shape == "tiny" else shape_config(shape)
        print(f"building a random {shape} model into {folder} (once)", flush=True)
        save_random_model(config, folder, tok)
    cases = world.edit_cases(n_cases, seed=0)
    (folder / "cases.json").write_text(json.dumps([counterfact_record(c) for c in cases], indent=1))
    (folder / "corpus.txt").write_text("\n".join(world.corpus()[:n_sentences]) + "\n")
    return folder


def bench_config(args, folder: Path):
    """``lme-sim bench``'s config for the runtime section on ``folder``."""
    from lme_sim.bench import FULL, check_config

    layers = LAYERS[args.shape]
    stats = {"kind": "file", "path": str(folder / "corpus.txt"), "n_samples": args.corpus_sentences}
    cfg = dataclasses.replace(
        FULL,
        preset=f"scale-{args.shape}",
        model=str(folder),
        data=str(folder / "cases.json"),
        sections=("runtime",),
        shard_counts=(args.shards,),
        runtime_batches=(("ultraedit", args.ultraedit_batch), ("alphaedit", args.alphaedit_batch)),
        runtime_hparams={
            "ultraedit": {"layers": layers["ultraedit"]},
            "alphaedit": {"layers": layers["alphaedit"], "stats": stats},
        },
        dtypes=tuple(args.dtypes.split(",")),
        runtime_eval_cases=args.eval_cases,
    )
    check_config(cfg)
    return cfg


def main(argv=None) -> int:
    from lme_sim.bench import BenchError, run_bench
    from lme_sim.bench_tables import print_result
    from lme_sim.paths import cache_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(LAYERS), default="llama3.2-1b")
    p.add_argument("--folder", default=None, help="the model folder (default: $LME_SIM_CACHE/scale/<shape>)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, one configuration each")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--ultraedit-batch", type=int, default=100)
    p.add_argument("--alphaedit-batch", type=int, default=10)
    p.add_argument("--corpus-sentences", type=int, default=300, help="AlphaEdit's key-statistics corpus")
    p.add_argument("--eval-cases", type=int, default=10, help="cases the evaluator scores after the batch")
    p.add_argument("--out", default=None, help="JSON result (default: runs/scale-<shape>.json)")
    p.add_argument("--db", default="runs/bench.duckdb")
    args = p.parse_args(argv)
    folder = Path(args.folder) if args.folder else cache_root() / "scale" / args.shape
    n_cases = max(args.ultraedit_batch, args.alphaedit_batch)
    prepare(folder, args.shape, n_cases, args.corpus_sentences)
    try:
        cfg = bench_config(args, folder)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/scale-{args.shape}.json")
    result = run_bench(cfg, out, args.db)
    print_result(result)
    print(f"wrote {out}; rows in table bench_results of {args.db} (bench_id {result['bench_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
