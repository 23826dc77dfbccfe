"""The coordinator: drives the edit stream through the editor, the evaluators and the logger.

Per batch: the editor actor writes the batch through the shard actors; the accumulated deltas,
the editor's state and the stream position are checkpointed; then the batch row, its edits and
the weight health of every edited matrix are committed to DuckDB in one transaction (the batch
row names the checkpoint). Evaluators receive only the changed tensors with the new version and
score eval checkpoints asynchronously; each probe row carries the version it was scored on.
``resume`` restarts from the last committed batch: no edit is lost or written twice.

Faults: a batch whose deltas fail the delta guard is undone and logged in ``rejected_batches``;
a dead evaluator is restarted and re-synced (:mod:`.evaluation`); a dead shard, editor, stream or
logger stops the run cleanly (:mod:`.failures`).
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..cases import EditCase
from ..data import load_counterfact, load_zsre
from ..general_ability import MCItem, probe_items
from ..metrics import CONSISTENCY_UNAVAILABLE
from ..scenario import Scenario
from ..storage.logger import RunLogger
from ..stream import EditStream, Event, SimClock, build_events
from .evaluation import RESTARTABLE, EvalPool
from .failures import actor_roles, stop_run
from .ray_utils import evaluator_options, init_ray, on_this_node, placement_summary, release, start_shards
from .services import EditorService, Evaluator

SUMMARY_METRICS = ("efficacy", "generalization", "specificity", "retention")


def scenario_cases(scn: Scenario, world) -> list[EditCase]:
    d = scn.data
    if d.kind == "world":
        return world.edit_cases(d.n_edits, seed=d.seed)
    if d.kind == "counterfact":
        return load_counterfact(d.path, limit=d.n_edits)
    return load_zsre(d.path, target=d.zsre_target, limit=d.n_edits)


def scenario_events(scn: Scenario) -> list[Event]:
    """The scenario's timed events (the history pattern replays the world's dated changes)."""
    from ..models import load_tokenizer

    _, world = load_tokenizer(scn.model)
    history = scn.stream.timeline is not None and scn.stream.timeline.pattern == "history"
    cases = None if history else scenario_cases(scn, world)
    start = dt.datetime.fromisoformat(scn.stream.start)
    return build_events(scn.timeline(), cases, world, start, seed=scn.data.seed)


def general_ability_items(scn: Scenario, events: list[Event]) -> list[MCItem]:
    """The run's multiple-choice set (fixed for the whole run): a file, the world's facts that no
    event of the stream edits, or the built-in set."""
    spec = scn.eval.general_ability
    if spec.n == 0:
        return []
    from ..models import load_tokenizer

    world = load_tokenizer(scn.model)[1] if scn.model.startswith("world:") and not spec.path else None
    edited = {(e.case.subject, e.case.relation) for e in events if e.case is not None}
    return probe_items(spec.n, spec.path, world, edited, seed=scn.data.seed)


def run_distributed(scn: Scenario, scenario_path: str, db: str | None = None, address: str | None = None,
                    resume: str | None = None, console: Console | None = None, tag: str | None = None) -> str:
    """Run ``scn`` (one editing method) on Ray; returns the run id (``<name>[-<tag>]-<hex>``).
    ``resume``: a run id to continue."""
    console = console or Console()
    db = db or scn.db
    from ..editors import editor_class

    spec = scn.editor
    scn = scn.with_editor(spec.model_copy(update={"hparams": editor_class(spec.method).prepare(scn.model, spec.hparams)}))
    ray = init_ray(address)
    events = scenario_events(scn)  # (trains and caches a world model here, before the shards load it)
    from ..scenario import model_n_layers

    rt = scn.runtime  # a cluster that cannot hold the shards fails before anything is written
    shards = start_shards(scn.model, rt.shards, model_n_layers(scn.model), rt.gpus, rt.placement, rt.dtype)
    console.print(f"placement {rt.placement}: {placement_summary(shards)}")
    stream = ray.remote(EditStream).options(num_cpus=0).remote(events, scn.stream.batch_size)
    clock = SimClock(scn.stream.speedup)
    logger = ray.remote(RunLogger).options(num_cpus=0, **on_this_node()).remote(db)  # the db path is the driver's
    run_id = resume or "-".join([scn.name] + ([tag] if tag else []) + [uuid.uuid4().hex[:8]])
    ray.get(logger.start_run.remote(run_id, scn.name, str(scenario_path), scn.model_dump(mode="json"), scn.model,
                                    scn.editor.method, resume=resume is not None))
    opts = {"num_cpus": 0}
    editor = ray.remote(EditorService).options(**opts).remote(scn.model, shards.shards, scn.editor.method,
                                                                scn.editor.hparams, scn.editor.max_delta_norm)
    ev = scn.evaluator
    engine = ev.model_dump(exclude={"backend"})
    general = general_ability_items(scn, events)
    evaluators = [ray.remote(Evaluator)
                  .options(**evaluator_options(ev.backend, ev.tensor_parallel_size, rt.gpus), **RESTARTABLE)
                  .remote(scn.model, scn.eval.batch_size, scn.eval.fluency_prompts, ev.backend, engine,
                          general_items=general, device="cuda" if rt.gpus else "cpu", dtype=rt.dtype)
                  for _ in range(rt.evaluators)]
    pool = EvalPool(ray, evaluators, console)
    ckpt_dir = Path(db).parent / "checkpoints" / run_id
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _RunState()
    roles = actor_roles({"stream": stream, "logger": logger, "editor": editor,
                         **{f"evaluator {i}": h for i, h in enumerate(evaluators)},
                         **{f"shard {i} (layers {r.start}-{r.stop - 1})": h
                            for i, (h, r) in enumerate(zip(shards.shards, shards.ranges))}})
    actors = [stream, logger, editor, *evaluators, *shards.shards]
    try:
        if resume:
            state = _restore(ray, logger, run_id, editor, pool, stream)
            console.print(f"resuming {run_id} after batch {state.batch_id}")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{scn.editor.method} on {scn.model}", total=len(events),
                                     completed=ray.get(stream.state_dict.remote())["position"])
            while (item := ray.get(stream.next_batch.remote())) is not None:
                clock.wait_until(item.time if isinstance(item, Event) else item[-1].time)
                if isinstance(item, Event):  # an eval checkpoint: score asynchronously
                    state.eval_id += 1
                    pool.submit(state.eval_id, state.batch_id, _retention_probes(state, scn), state.recent)
                else:
                    _edit_batch(ray, scn, run_id, item, editor, pool, logger, stream, state, ckpt_dir, console)
                _log_evaluations(ray, logger, run_id, pool.collect(wait=False))
                progress.update(task, completed=ray.get(stream.state_dict.remote())["position"])
        _log_evaluations(ray, logger, run_id, pool.collect(wait=True))
        ray.get(logger.finish_run.remote(run_id))
        _print_summary(ray, logger, run_id, db, console)
        ray.get(logger.close.remote())
    except BaseException as e:  # noqa: BLE001  (a dead actor, or Ctrl-C: the run is marked failed)
        hint = f"lme-sim run {scenario_path} --resume {run_id}" + (f" --db {db}" if db != scn.db else "")
        raise stop_run(ray, e, logger, run_id, roles, hint,
                       lambda: release(actors, shards.placement_group)) from None
    release(actors, shards.placement_group)
    return run_id


class _RunState:
    def __init__(self):
        self.batch_id, self.version, self.eval_id = -1, 0, 0
        self.cum: dict[str, torch.Tensor] = {}
        self.latest: dict[str, dict] = {}  # fact_key -> {edit_id, prompt, value, earlier}
        self.recent: list = []  # the last retention_sample edited cases: the papers metrics are taken on them


def _edit_batch(ray, scn, run_id, batch, editor, pool, logger, stream, state, ckpt_dir, console):
    t0 = time.perf_counter()
    result = ray.get(editor.edit.remote([e.case for e in batch]))
    if "rejected" in result:  # the editor undid it: no model copy has it; logged with the next commit
        ids = [e.edit_id for e in batch]
        ray.get(logger.append.remote("rejected_batches", [{
            "run_id": run_id, "after_batch": state.batch_id, "sim_time": batch[-1].time, "n_edits": len(batch),
            "edit_ids": ids, "reason": result["rejected"], "rejected_at": dt.datetime.now(dt.timezone.utc)}]))
        console.print(f"[yellow]rejected[/] the batch of edits {ids[0]}..{ids[-1]}: {result['rejected']}; "
                      "the model is unchanged")
        return
    stats = ray.get(editor.weight_stats.remote())
    state.batch_id += 1
    state.version += 1
    for name, d in result["deltas"].items():
        state.cum[name] = state.cum[name] + d if name in state.cum else d.clone()
    for e in batch:
        prev = state.latest.get(e.fact_key)
        earlier = (prev["earlier"] + [prev["value"]]) if prev else ([e.case.target_true] if e.case.target_true else [])
        state.latest[e.fact_key] = {"edit_id": e.edit_id, "prompt": e.case.prompt, "value": e.case.target_new,
                                    "earlier": earlier}
    state.recent = (state.recent + [e.case for e in batch])[-scn.eval.retention_sample:]
    ckpt = ckpt_dir / f"batch-{state.batch_id:06d}.pt"
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"deltas": state.cum, "editor": ray.get(editor.state_dict.remote()),
                "stream": ray.get(stream.state_dict.remote()),
                "latest": state.latest, "recent": state.recent, "version": state.version, "eval_id": state.eval_id}, tmp)
    tmp.rename(ckpt)
    modules = sorted(result["deltas"])
    touched = result.get("touched") or [modules] * len(batch)
    norm_of = {m: float(d.norm()) for m, d in result["deltas"].items()}
    edits = [{"edit_id": e.edit_id, "batch_id": state.batch_id, "step": state.batch_id, "sim_time": e.time,
              "kind": e.kind, "case_id": e.case.case_id, "fact_key": e.fact_key, "subject": e.case.subject,
              "relation": e.case.relation, "prompt": e.case.prompt, "target_new": e.case.target_new,
              "target_old": e.case.target_true, "supersedes": e.supersedes, "modules": sorted(mods),
              "delta_norms": [norm_of.get(m, 0.0) for m in sorted(mods)]} for e, mods in zip(batch, touched)]
    ws = [{"batch_id": state.batch_id, "model_version": state.version, "delta_norm":
           float(result["deltas"][r["module"]].norm()) if r["module"] in result["deltas"] else 0.0, **r}
          for r in stats]
    row = {"batch_id": state.batch_id, "step": state.batch_id, "sim_time": batch[-1].time, "n_edits": len(batch),
           "model_version": state.version, "seconds": time.perf_counter() - t0, "timings": result["timings"],
           "checkpoint": str(ckpt)}
    ray.get(logger.commit_batch.remote(run_id, row, {"edits": edits, "weight_stats": ws}))
    for old in sorted(ckpt_dir.glob("batch-*.pt"))[:-2]:  # keep the last two
        old.unlink()
    pool.apply(result["deltas"], state.version, state.cum)


def _retention_probes(state: _RunState, scn: Scenario) -> list[dict]:
    items = list(state.latest.values())
    if len(items) > scn.eval.retention_sample:
        items = random.Random(state.eval_id).sample(items, scn.eval.retention_sample)
    return items


def _log_evaluations(ray, logger, run_id, results: list[dict]) -> None:
    for out in results:
        for table in ("probes", "metrics"):
            ray.get(logger.append.remote(table, [{"run_id": run_id, **r} for r in out[table]]))


def _restore(ray, logger, run_id, editor, pool, stream) -> _RunState:
    rows = ray.get(logger.query.remote(
        f"select batch_id, checkpoint from batches where run_id = '{run_id}' order by batch_id desc limit 1"))
    state = _RunState()
    if not rows:
        return state
    state.batch_id, path = rows[0]
    ckpt = torch.load(path, weights_only=False)
    ray.get(editor.apply.remote(ckpt["deltas"]))
    ray.get(editor.load_state_dict.remote(ckpt["editor"]))
    pool.load(ckpt["deltas"], ckpt["version"])
    ray.get(stream.load_state_dict.remote(ckpt["stream"]))
    state.version, state.eval_id, state.cum = ckpt["version"], ckpt["eval_id"], ckpt["deltas"]
    state.latest, state.recent = ckpt["latest"], ckpt["recent"]
    # the evaluation of the last committed batch and any later one are redone (same eval ids)
    for table in ("probes", "metrics"):
        ray.get(logger.query.remote(f"delete from {table} where run_id = '{run_id}' and step >= {state.batch_id}"))
    return state


def _print_summary(ray, logger, run_id, db, console):
    from rich.table import Table

    rows = ray.get(logger.query.remote(
        f"select name, value from metrics where run_id = '{run_id}' and eval_id = "
        f"(select max(eval_id) from metrics where run_id = '{run_id}')"))
    n_edits = ray.get(logger.query.remote(f"select count(*) from edits where run_id = '{run_id}'"))[0][0]
    table = Table(title=f"run {run_id}", caption=f"{n_edits} edits; final evaluation")
    table.add_column("metric")
    table.add_column("final", justify="right")
    for name, value in sorted(rows):
        table.add_row(name, f"{value:.3f}")
    console.print(table)
    console.print(CONSISTENCY_UNAVAILABLE)
    console.print(f"DuckDB: {Path(db).resolve()}   e.g.  lme-sim query \"select count(*) from edits\" --db {db}")
