"""A 2-run study, its runs at once against one after the other, side by side in one process.

The study is one editor over two seeds (two runs of equal work) on the embedded world; both ways run
through :func:`lme_sim.runtime.coordinator.run_study` on one local Ray, alternating (sequential first,
then concurrent first, ...), each into a database of its own. Every actor has one torch thread (Ray
sets OMP_NUM_THREADS=1 in its workers; this driver sets it too). Prints each repeat's wall time, how
many cores were busy on average (the machine's busy CPU time over the wall time, from /proc/stat: it
says how much room the sequential way left), and the median ratio sequential / concurrent, and writes
a JSON result (benchmarks/results/).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/concurrent_runs.py [--model world:default]
        [--method alphaedit] [--n-edits 100] [--batch-size 10] [--shards 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from lme_sim.runtime.coordinator import run_study  # noqa: E402
from lme_sim.runtime.ray_utils import init_ray  # noqa: E402
from lme_sim.runtime.study import StudyRun, new_study_hex, run_id  # noqa: E402
from lme_sim.scenario import Scenario  # noqa: E402


def study(args, concurrent: int, db: Path) -> list[StudyRun]:
    scn = Scenario.model_validate(
        {
            "name": f"bench-{'concurrent' if concurrent > 1 else 'sequential'}",
            "model": args.model,
            "data": {"kind": "world", "n_edits": args.n_edits},
            "editor": {"method": args.method},
            "stream": {"batch_size": args.batch_size},
            "eval": {"every": args.eval_every, "fluency_prompts": 0},
            "runtime": {"shards": args.shards, "concurrent_runs": concurrent},
            "seeds": [0, 1],
            "db": str(db),
        }
    )
    hexa = new_study_hex()
    return [StudyRun(scn.with_seed(s), run_id(scn.name, f"s{s}", hexa)) for s in scn.seeds]


def cpu_seconds() -> float:
    """The machine's busy CPU seconds so far, all cores (/proc/stat: every field but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed(args, concurrent: int, folder: Path) -> tuple[float, float]:
    """(wall seconds, cores busy on average: the machine's busy CPU seconds / wall seconds)."""
    db = folder / f"{concurrent}-{time.time_ns()}.duckdb"
    t0, c0 = time.perf_counter(), cpu_seconds()
    outcome = run_study(
        study(args, concurrent, db), "benchmarks/concurrent_runs.py", console=Console(quiet=True)
    )
    seconds = time.perf_counter() - t0
    if failed := [e for e in outcome.values() if e is not None]:
        raise SystemExit(f"a run failed: {failed[0]}")
    return seconds, (cpu_seconds() - c0) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="world:default")
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timed(args, 1, Path(tmp))  # warm-up: the world model trained or loaded, caches filled
        for k in range(args.repeats):
            order = (1, 2) if k % 2 == 0 else (2, 1)
            got = {c: timed(args, c, Path(tmp)) for c in order}
            (seq, seq_busy), (con, con_busy) = got[1], got[2]
            rows.append(
                {
                    "sequential_s": seq,
                    "concurrent_s": con,
                    "ratio": seq / con,
                    "sequential_cores_busy": seq_busy,
                    "concurrent_cores_busy": con_busy,
                }
            )
            print(
                f"repeat {k}: sequential {seq:.1f} s ({seq_busy:.2f} cores busy), concurrent {con:.1f} s "
                f"({con_busy:.2f} cores busy), ratio {seq / con:.2f}x",
                flush=True,
            )
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio sequential / concurrent: {ratio:.2f}x ({args.repeats} repeats)")
    result = {
        "benchmark": "concurrent_runs",
        "args": vars(args),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "repeats": rows,
        "median_ratio": ratio,
    }
    out = Path(args.out) / "concurrent_runs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
