"""What the generative metrics add to an evaluation on SmolLM2-135M: one evaluator (HF, in process, one
torch thread) scores the same request with ``generative`` off and on, alternately, ``repeats`` times
each (so both sides see the same load); prints the median seconds of each and their ratio, and writes
a JSON line to ``--out``. Beside wall seconds it records the process's CPU seconds (one thread:
the work itself, which other jobs on a shared machine do not inflate).

The request is what a long-horizon run sends: N CounterFact edits (their rewrite, paraphrase and
neighborhood probes), each edit's retention probe, 16 fluency prompts and the general-ability set.

Run from the repository root (needs ../shared/data/counterfact-edit.json or --data):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generative_cost.py --cases 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lme_sim.data import load_counterfact
from lme_sim.general_ability import probe_items
from lme_sim.runtime.services import EvalRequest, Evaluator, RetentionItem
from lme_sim.sysinfo import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/counterfact-edit.json")
    ap.add_argument("--out", default="benchmarks/results/generative_cost.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = load_counterfact(args.data, limit=args.cases)
    ev = Evaluator("smollm2-135m", rows_per_pass=64, general_items=probe_items(64, None, None, set(), seed=0))
    retention = [RetentionItem(i, c.prompt, c.target_new, [c.target_true]) for i, c in enumerate(cases)]
    fluency = [c.prompt for c in cases[:16]]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    metrics = {}
    for r in range(args.repeats):
        for generative in (False, True):
            req = EvalRequest(
                eval_id=r,
                retention=retention,
                cases=cases,
                n_edits=len(cases),
                fluency_prompts=fluency,
                generative=generative,
            )
            t0, c0 = time.perf_counter(), time.process_time()
            out = ev.evaluate(req)
            seconds[generative].append(time.perf_counter() - t0)
            cpu[generative].append(time.process_time() - c0)
            metrics[generative] = {m.name: round(m.value, 4) for m in out.metrics}
            print(
                f"repeat {r}, generative={generative}: {seconds[generative][-1]:.1f} s wall, "
                f"{cpu[generative][-1]:.1f} s CPU",
                flush=True,
            )
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    row = {
        "cases": len(cases),
        "probe_prompts": sum(1 + len(c.paraphrases) + len(c.neighborhood) for c in cases),
        "seconds_teacher_forced": off,
        "seconds_with_generative": on,
        "ratio": on / off,
        "cpu_seconds_teacher_forced": cpu_off,
        "cpu_seconds_with_generative": cpu_on,
        "cpu_ratio": cpu_on / cpu_off,
        "all_seconds": {"off": seconds[False], "on": seconds[True]},
        "all_cpu_seconds": {"off": cpu[False], "on": cpu[True]},
        "metrics_with_generative": metrics[True],
        "machine": machine_info(),
    }
    print(
        f"{len(cases)} cases: teacher-forced only {off:.1f} s, with generative {on:.1f} s: "
        f"{on / off:.2f}x (median of {args.repeats}); "
        f"CPU {cpu_off:.1f} s and {cpu_on:.1f} s: {cpu_on / cpu_off:.2f}x"
    )
    print("metrics:", metrics[True])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
