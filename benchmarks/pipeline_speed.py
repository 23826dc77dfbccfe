"""Pipelined shards against today's path (issue 32), side by side in one run: AlphaEdit's edit of one
batch through shard actors, with the pipeline on (chunks of independent requests through the shards at
once) and off (one chunk after the other), alternating, for each shard layout.

Each layout starts its own actors (one torch thread each, like the runtime's; this process is the
editor, one thread too) and one editor on them; after an untimed warm-up of each path, ``--repeats``
rounds edit the same batch on the same weights once per path (the order flips every round; the weights
and the editor's state are put back after each edit). Reported per layout and path: the median seconds
per batch and edits/s, its phases (targets, keys, solve, apply), the ratio pipelined / today and each
against 1 shard's today's path, and how far the two paths' deltas are apart (relative). A layout is
``N`` (N shards, near-equal layer ranges as the runtime cuts them) or ``N:c1:c2..`` (cut before blocks
c1, c2, ...: e.g. ``2:19`` balances SmolLM2's suffix steps, blocks 8-29, over two shards).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_speed.py --model world:default
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_speed.py --model smollm2-135m \\
        --data ../shared/data/counterfact-edit.json --layouts 1,2,2:19
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from lme_sim.models import LoadedModel
from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the long-horizon study's AlphaEdit statistics (scenarios/long-horizon-smollm2.yaml): cached once
SMOLLM2_HPARAMS = {"stats": {"kind": "cases", "source": "counterfact-train", "n_samples": 20000}}


class OneThreadShard(ModelShard):
    """A shard actor on one torch thread, whatever Ray set in its environment."""

    def __init__(self, *args, **kw):
        torch.set_num_threads(1)
        super().__init__(*args, **kw)

    def threads(self) -> int:
        return torch.get_num_threads()


def layout_ranges(layout: str, n_layers: int) -> list[range]:
    """``"2"``: the runtime's near-equal cut; ``"2:19"``: blocks 0-18 and 19-.. (``runtime: {shards: 2,
    cuts: [19]}``)."""
    n, *cuts = (int(x) for x in layout.split(":"))
    try:
        return split_layers(n_layers, n, cuts or None)
    except ValueError as e:
        raise SystemExit(f"--layouts: {layout!r}: {e}") from None


def relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def time_layout(ray, args, layout: str, n_layers: int, tok, world, cases, hparams: dict) -> dict:
    from lme_sim.editors import make_editor

    ranges = layout_ranges(layout, n_layers)
    actor = ray.remote(OneThreadShard).options(num_cpus=0)
    shards = [actor.remote(args.model, r, "cpu", None) for r in ranges]
    try:
        assert ray.get([s.threads.remote() for s in shards]) == [1] * len(shards)
        backbone = ShardedBackbone(shards)
        editor = make_editor(
            "alphaedit", LoadedModel(args.model, backbone, tok, world), overrides=hparams, progress=False
        )
        layers = list(editor.hp.layers)

        def edit(pipeline: bool):
            backbone.pipeline = pipeline
            backbone.save_weights(layers)
            t0 = time.perf_counter()
            res = editor.edit(cases)
            seconds = time.perf_counter() - t0
            backbone.restore_weights()
            editor.discard()
            return seconds, res

        for pipeline in (False, True):  # warm-up: the actors' first passes, allocator, caches
            edit(pipeline)
        runs: dict[bool, list] = {False: [], True: []}
        deltas: dict[bool, dict] = {}
        for r in range(args.repeats):
            for pipeline in (False, True) if r % 2 == 0 else (True, False):
                seconds, res = edit(pipeline)
                runs[pipeline].append((seconds, res.timings))
                deltas[pipeline] = res.deltas
                print(
                    f"  {layout}: {'pipelined' if pipeline else 'today'} {seconds:.2f} s ("
                    + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items())
                    + ")",
                    flush=True,
                )
        out = {"layout": layout, "ranges": [(r.start, r.stop) for r in ranges]}
        for pipeline, name in ((False, "today"), (True, "pipelined")):
            secs = [s for s, _ in runs[pipeline]]
            phases = {k: statistics.median(t[k] for _, t in runs[pipeline]) for k in runs[pipeline][0][1]}
            med = statistics.median(secs)
            out[name] = {
                "seconds": secs,
                "median_s": med,
                "edits_per_s": len(cases) / med,
                "phases_s": phases,
            }
        out["pipelined_over_today"] = out["today"]["median_s"] / out["pipelined"]["median_s"]
        out["deltas_relative"] = relative(deltas[True], deltas[False])
        return out
    finally:
        for s in shards:
            ray.kill(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="world:default")
    ap.add_argument(
        "--data", default=str(SHARED / "counterfact-edit.json"), help="CounterFact JSON (real models)"
    )
    ap.add_argument("--batch", type=int, default=10, help="edits in the batch")
    ap.add_argument("--layouts", default="1,2", help="shard layouts: N or N:cut:..; e.g. 1,2,2:19")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each: both paths)")
    ap.add_argument("--hparams", default=None, help="AlphaEdit overrides, YAML")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from lme_sim.bench import data_cases, is_world
    from lme_sim.models import load_tokenizer
    from lme_sim.runtime.ray_utils import init_ray
    from lme_sim.sysinfo import machine_info, versions

    tok, world = load_tokenizer(args.model)
    if is_world(args.model):
        cases, hparams = world.edit_cases(args.batch, seed=0), {}
    else:
        cases, hparams = data_cases(args.data, args.batch), dict(SMOLLM2_HPARAMS)
    hparams.update(yaml.safe_load(args.hparams) if args.hparams else {})

    ray = init_ray()
    probe = ray.remote(OneThreadShard).options(num_cpus=0).remote(args.model, range(0, 1), "cpu", None)
    n_layers = ray.get(probe.info.remote())["n_layers"]
    ray.kill(probe)
    machine = machine_info()
    print(f"{args.model}: {n_layers} layers, batch {args.batch}, load average {os.getloadavg()}", flush=True)
    layouts = [
        time_layout(ray, args, lay, n_layers, tok, world, cases, hparams) for lay in args.layouts.split(",")
    ]
    base = next((r["today"]["median_s"] for r in layouts if r["layout"] == "1"), None)
    for r in layouts:
        for name in ("today", "pipelined"):
            r[name]["over_1_shard_today"] = base / r[name]["median_s"] if base else None
        print(
            f"{r['layout']:>6} {r['ranges']}: today {r['today']['edits_per_s']:.2f} edits/s, pipelined "
            f"{r['pipelined']['edits_per_s']:.2f} edits/s ({r['pipelined_over_today']:.2f}x"
            + (f"; {r['pipelined']['over_1_shard_today']:.2f}x 1 shard" if base else "")
            + f"); deltas {r['deltas_relative']:.1e} apart",
            flush=True,
        )
    result = {
        "benchmark": "pipeline_speed",
        "model": args.model,
        "batch": args.batch,
        "repeats": args.repeats,
        "hparams": hparams,
        "load_average_end": os.getloadavg(),
        "machine": machine,
        "versions": versions(),
        "layouts": layouts,
    }
    name = args.model.replace(":", "-").replace("/", "-")
    out = Path(args.out or Path(__file__).parent / "results" / f"pipeline-speed-{name}-{args.batch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
