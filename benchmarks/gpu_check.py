"""The GPU check (issue 31): the editing math of lme-sim on one accelerator, in one process.

    PYTHONPATH=. python benchmarks/gpu_check.py                       # Llama-3-8B shape, bf16, cuda
    PYTHONPATH=. python benchmarks/gpu_check.py --shape tiny --device cpu --out /tmp/check   # seconds

A random model of Llama-3-8B's shape (``--shape llama3-8b``: 32 blocks of width 4096, d_ff 14336,
grouped-query attention, vocabulary 128256; about 8.0B parameters, 16 GB in bfloat16) or a tiny
Llama (``--shape tiny``, for the test suite) on ``--device``, edited in this process: no Ray, vLLM or
DuckDB; torch, transformers and lme-sim's pure modules only (so it runs from the repository root with
``PYTHONPATH=.`` where the project is not installed; pydantic is the one package besides torch and
transformers that lme-sim's editors import).

Edits: synthetic CounterFact-like cases (subject, relation prompt, new and true object, paraphrases,
neighbourhood prompts) from lme-sim's embedded world generator (``lme_sim.world``), tokenized by its
word-level tokenizer; nothing is read from disk or downloaded. Key statistics (MEMIT's C0 and
AlphaEdit's null-space projector): from a built-in corpus of random word sequences over that
vocabulary (``--corpus-texts`` texts of 128 tokens: 200 by default, 25,600 tokens, more than d_ff, so
that C0 has full rank), computed once before any timing.

Figures (each timer starts and stops after ``torch.cuda.synchronize()``, through
``lme_sim.sysinfo.Measure``), written as JSON to ``--out`` (default ``$OUT``, else ``.``) with the
machine, the versions and the settings:

* ``ultraedit``: edits/s at batch ``--batch`` (100), 3 timed batches after one warm-up;
* ``alphaedit``: seconds per batch, suffix passes and reference passes (the same batch, from the same
  weights);
* ``memit``, ``mose``: seconds for one batch each;
* ``probes``: teacher-forced probes scored per second (the HF evaluator's scoring);
* ``generation``: greedy tokens generated per second;
* ``peak_cuda_mb``: the largest CUDA memory allocated over the run (null on the CPU).

Each method edits from the original weights (they are put back after each). A figure that fails
records its error and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lme_sim.arch import weight_view
from lme_sim.editors import make_editor
from lme_sim.models import LoadedModel
from lme_sim.random_models import llama3_8b_config, random_model, tiny_config
from lme_sim.scoring import greedy_generate, score_targets
from lme_sim.sysinfo import Measure, machine_info, versions
from lme_sim.world import World, get_world_config
from lme_sim.world_model import build_tokenizer

FIGURES = ("ultraedit", "alphaedit", "memit", "mose", "probes", "generation")
# layers edited per shape: Llama-3-8B as the papers edit it (MEMIT/AlphaEdit 4-8; MOSE as in its
# hparams file; UltraEdit the last blocks' MLP output, as its published Mistral-7B setting)
LAYERS = {
    "llama3-8b": {
        "ultraedit": [29, 30],
        "alphaedit": [4, 5, 6, 7, 8],
        "memit": [4, 5, 6, 7, 8],
        "mose": [19, 20, 21],
    },
    "tiny": {"ultraedit": [2, 3], "alphaedit": [1, 2], "memit": [1, 2], "mose": [1, 2]},
}


def build_model(shape: str, tok, device: str, dtype: torch.dtype):
    cfg = llama3_8b_config() if shape == "llama3-8b" else tiny_config("llama", tok)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    return random_model(cfg, dtype=dtype, device=device)


def corpus_file(world: World, n_texts: int, folder: Path, seed: int = 0) -> Path:
    """``n_texts`` random sequences of 128 of the world's words, one per line."""
    rng = random.Random(seed)
    words = list(world.vocabulary)
    path = folder / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=128)) for _ in range(n_texts)) + "\n")
    return path


class Check:
    """The model, the edits and the settings shared by the figures."""

    def __init__(self, args, work: Path):
        self.args, self.device = args, args.device
        self.world = World(get_world_config("default"))
        self.tok = build_tokenizer(self.world)
        dtype = getattr(torch, args.dtype)
        with Measure(self.device) as m:
            self.model = build_model(args.shape, self.tok, self.device, dtype)
        self.build_s = m.seconds
        n = args.batch
        pool = self.world.edit_cases(n * 8, seed=0)  # distinct facts: each method edits its own batches
        self.batches = [pool[i * n : (i + 1) * n] for i in range(8)]
        self.layers = LAYERS[args.shape]
        self.stats = {
            "kind": "file",
            "path": str(corpus_file(self.world, args.corpus_texts, work)),
            "n_samples": args.corpus_texts,
            "max_length": 128,
        }
        edited = sorted({l for ls in self.layers.values() for l in ls})
        self.original = {l: weight_view(self.model, l).detach().clone() for l in edited}

    def restore(self) -> None:
        with torch.no_grad():
            for l, w in self.original.items():
                weight_view(self.model, l).copy_(w)

    def editor(self, method: str, overrides: dict | None = None):
        hp = {"layers": self.layers[method], **(overrides or {})}
        if method in ("memit", "alphaedit"):
            hp["stats"] = self.stats
        return make_editor(
            method,
            LoadedModel(f"gpu-check:{self.args.shape}", self.model, self.tok),
            overrides=hp,
            progress=False,
            device=self.device,
        )

    def timed_edit(self, editor, batch) -> dict:
        with Measure(self.device) as m:
            result = editor.edit(batch)
        return {"seconds": m.seconds, "cuda_peak_mb": m.cuda_peak_mb, "phases": result.timings}


def ultraedit(c: Check) -> dict:
    editor = c.editor("ultraedit")
    warm = c.timed_edit(editor, c.batches[0])
    timed = [c.timed_edit(editor, b) for b in c.batches[1:4]]
    seconds = [t["seconds"] for t in timed]
    return {
        "batch": c.args.batch,
        "warmup_s": warm["seconds"],
        "seconds": seconds,
        "edits_per_s": c.args.batch * len(seconds) / sum(seconds),
        "cuda_peak_mb": max(t["cuda_peak_mb"] or 0 for t in timed) or None,
        "phases": timed[-1]["phases"],
    }


def alphaedit(c: Check) -> dict:
    with Measure(c.device) as setup:  # key statistics and null-space projectors (once per model)
        editor = c.editor("alphaedit")
    out = {"batch": c.args.batch, "setup_s": setup.seconds}
    for path, reuse in (("suffix", True), ("reference", False)):
        c.restore()
        editor = c.editor("alphaedit")  # statistics and projectors from the cache: no recomputation
        editor.reuse = reuse
        out[path] = c.timed_edit(editor, c.batches[4])
    out["reference_over_suffix"] = out["reference"]["seconds"] / out["suffix"]["seconds"]
    return out


def memit(c: Check) -> dict:
    with Measure(c.device) as setup:
        editor = c.editor("memit")
    return {"batch": c.args.batch, "setup_s": setup.seconds, **c.timed_edit(editor, c.batches[5])}


def mose(c: Check) -> dict:
    return {"batch": c.args.batch, **c.timed_edit(c.editor("mose"), c.batches[6])}


def probes(c: Check) -> dict:
    cases = c.batches[7]
    prompts = [p for x in cases for p in (x.prompt, *x.paraphrases, *(q for q, _ in x.neighborhood))]
    targets = [
        t for x in cases for t in [x.target_new] * (1 + len(x.paraphrases)) + [o for _, o in x.neighborhood]
    ]
    score_targets(c.model, c.tok, prompts[:64], targets[:64])  # warm-up
    with Measure(c.device) as m:
        score_targets(c.model, c.tok, prompts, targets)
    return {"probes": len(prompts), "seconds": m.seconds, "probes_per_s": len(prompts) / m.seconds}


def generation(c: Check) -> dict:
    prompts = [x.prompt for x in c.batches[7][:32]]
    new = 32
    greedy_generate(c.model, c.tok, prompts[:4], max_new_tokens=4)  # warm-up
    with Measure(c.device) as m:
        greedy_generate(c.model, c.tok, prompts, max_new_tokens=new, cache=True)
    return {
        "prompts": len(prompts),
        "new_tokens": new,
        "seconds": m.seconds,
        "tokens_per_s": len(prompts) * new / m.seconds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(LAYERS), default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the cpu")
    p.add_argument("--batch", type=int, default=100, help="edits per batch")
    p.add_argument("--corpus-texts", type=int, default=200, help="texts of 128 words for the key statistics")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of gpu_check.json")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: --device cuda: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    out_path = Path(args.out) / "gpu_check.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(),
        "versions": versions(),
        "settings": vars(args) | {"layers": LAYERS[args.shape]},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("LME_SIM_CACHE", str(Path(work) / "cache"))  # statistics of this model only
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        c = Check(args, Path(work))
        report["model"] = {
            "parameters": sum(p.numel() for p in c.model.parameters()),
            "dtype": args.dtype,
            "build_s": c.build_s,
        }
        failed = []
        for name in FIGURES:
            c.restore()
            try:
                report[name] = globals()[name](c)
            except Exception as e:  # noqa: BLE001  (every figure is tried; the error is recorded)
                failed.append(name)
                report[name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            print(f"{name}: {json.dumps(report[name], default=str)[:300]}", flush=True)
            out_path.write_text(json.dumps(report, indent=1, default=str))  # what is done so far
    report["peak_cuda_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    )
    report["total_s"] = time.perf_counter() - t0
    report["failed"] = failed
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out_path} ({'failed: ' + ', '.join(failed) if failed else 'every figure'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
