"""A minimal in-process run of a scenario: edit in batches, evaluate, write JSON results.

(The Ray runtime with timed streams and DuckDB logging builds on the same pieces.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .cases import EditCase
from .data import load_counterfact, load_zsre
from .editors import make_editor
from .metrics import CONSISTENCY_UNAVAILABLE, case_metrics, fluency, retention, summarize
from .models import LoadedModel, load_model
from .scenario import Scenario

SHOWN = ("efficacy", "generalization", "specificity", "rewrite_acc", "paraphrase_acc", "locality_acc")


def scenario_cases(scn: Scenario, lm: LoadedModel) -> list[EditCase]:
    d = scn.data
    if d.kind == "world":
        return lm.world.edit_cases(d.n_edits, seed=d.seed)
    if d.kind == "counterfact":
        return load_counterfact(d.path, limit=d.n_edits)
    return load_zsre(d.path, target=d.zsre_target, limit=d.n_edits)


def run_in_process(scn: Scenario, console: Console | None = None) -> dict:
    console = console or Console()
    lm = load_model(scn.model)
    cases = scenario_cases(scn, lm)
    editor = make_editor(scn.editor.method, lm.model, lm.tok, scn.model, scn.editor.hparams, world=lm.world)
    before = summarize(case_metrics(lm.model, lm.tok, cases, scn.eval.batch_size))
    gen_prompts = [c.prompt for c in cases[: scn.eval.fluency_prompts]]
    if gen_prompts:
        before["fluency"] = fluency(lm.model, lm.tok, gen_prompts)
    bs = scn.stream.batch_size
    batches = [cases[i:i + bs] for i in range(0, len(cases), bs)]
    steps, t0 = [], time.time()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"editing ({scn.editor.method})", total=len(cases))
        for b, batch in enumerate(batches):
            result = editor.edit(batch)
            progress.advance(task, len(batch))
            if (b + 1) % scn.eval.every == 0 or b == len(batches) - 1:
                done = cases[: (b + 1) * bs]
                steps.append({"batch": b, "edits": len(done), "seconds": round(time.time() - t0, 2),
                              "timings": result.timings,
                              "all_edits": summarize(case_metrics(lm.model, lm.tok, done, scn.eval.batch_size)),
                              "this_batch": summarize(case_metrics(lm.model, lm.tok, batch, scn.eval.batch_size)),
                              "retention_earlier": _retention(lm, cases[: b * bs], scn.eval.batch_size)})
    out = Path(scn.output_dir) / scn.name
    out.mkdir(parents=True, exist_ok=True)
    after = dict(steps[-1]["all_edits"])
    if gen_prompts:
        after["fluency"] = fluency(lm.model, lm.tok, gen_prompts)
    summary = {"scenario": scn.model_dump(), "before": before, "after": after, "steps": steps,
               "seconds": round(time.time() - t0, 2), "consistency": CONSISTENCY_UNAVAILABLE}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    table = Table(title=f"{scn.name}: {scn.editor.method}, {len(cases)} edits", caption=f"model {scn.model}, batches of {bs}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for k in SHOWN + ("fluency",):
        if k in summary["after"]:
            table.add_row(k, f"{before.get(k, float('nan')):.3f}", f"{summary['after'][k]:.3f}")
    console.print(table)
    retained = [(st["edits"], st["retention_earlier"]) for st in steps if st["retention_earlier"] is not None]
    if retained:
        console.print("retention of earlier batches' edits: "
                      + ", ".join(f"{r:.2f} after {n} edits" for n, r in retained))
    console.print(CONSISTENCY_UNAVAILABLE)
    console.print(f"results: {out / 'results.json'}  ({summary['seconds']} s of editing and evaluation)")
    return summary


def _retention(lm: LoadedModel, earlier: list[EditCase], batch_size: int) -> float | None:
    """Share of the earlier batches' edits still in force (new value beats the old one)."""
    if not earlier:
        return None
    kept = retention(lm.model, lm.tok, [c.prompt for c in earlier], [c.target_new for c in earlier],
                     [[c.target_true] if c.target_true else [] for c in earlier], batch_size)
    return kept.mean().item()
