"""Weight health of an edited matrix (norms and condition number, logged after every batch): the
singular values from the smaller Gram matrix's eigenvalues (``lme_sim.weights.matrix_stats``) against
``torch.linalg.svdvals`` of the matrix, side by side in one process, alternating, at one torch thread,
on matrices of real models' MLP output shapes (random, the same for both sides). Both sides' condition
numbers are printed; they agree to 1e-9 here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weight_health.py [--repeats 20]

Writes benchmarks/results/weight_health.json (the machine's load average beside the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lme_sim.weights import matrix_stats  # noqa: E402

# (name, d_model, d_ff): the edited down_proj is d_model x d_ff
SHAPES = [("SmolLM2-135M", 576, 1536), ("Qwen2.5-0.5B", 896, 4864), ("Llama-3.2-1B", 2048, 8192)]


def svdvals_condition(W: torch.Tensor) -> float:
    s = torch.linalg.svdvals(W.double())
    return float(s[0] / s[-1])


def timed(fn, W) -> tuple[float, float]:
    t = time.perf_counter()
    out = fn(W)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/weight_health.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, d, f in SHAPES:
        W = torch.randn(d, f, generator=torch.Generator().manual_seed(0)) / f**0.5
        gram, svd = [], []
        for i in range(args.repeats + 1):  # the first round warms up, alternating sides
            for side, fn, out in (
                ("gram", lambda w: matrix_stats(w)["condition"], gram),
                ("svdvals", svdvals_condition, svd),
            ):
                s, cond = timed(fn, W)
                if i:
                    out.append(s)
                if side == "gram":
                    c_gram = cond
                else:
                    c_svd = cond
        row = {
            "model": name,
            "shape": [d, f],
            "gram_s": statistics.median(gram),
            "svdvals_s": statistics.median(svd),
            "ratio": statistics.median(svd) / statistics.median(gram),
            "condition": [c_gram, c_svd],
        }
        rows.append(row)
        print(
            f"{name} {d}x{f}: Gram {row['gram_s'] * 1e3:.1f} ms, svdvals {row['svdvals_s'] * 1e3:.1f} ms "
            f"(median of {args.repeats}): {row['ratio']:.2f}x; condition {c_gram:.6f} / {c_svd:.6f}"
        )
    result = {
        "rows": rows,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
