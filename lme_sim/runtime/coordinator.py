"""The coordinator: one run of one editing method, as a run object read top to bottom.

``run_distributed`` is four calls: :meth:`Run.setup` (the stream's events, Ray, the actors, the run
row or the state to resume), :meth:`Run.loop` (every batch through the editor, every eval checkpoint
to the evaluators), :meth:`Run.finish` (the last evaluations, the summary) and :meth:`Run.release`.

Per batch the editor actor writes the batch through the shard actors; its rows (the batch, its
edits, the weight health of every edited matrix) are committed to DuckDB in one transaction, and
every ``runtime.checkpoint_every`` batches the accumulated deltas, the editor's state and the stream
position are checkpointed first (between checkpoints no editor state is shipped or written).
Evaluators receive only the changed tensors with the new version and score asynchronously; each
probe row carries the version it was scored on. ``--resume`` restarts from the last checkpoint and
replays the batches after it from the stream, replacing their rows: no edit is lost or written twice.

Faults: a batch whose deltas fail the delta guard is undone and logged in ``rejected_batches``;
a dead evaluator is restarted and re-synced (:mod:`.evaluation`); anything else (a dead shard,
editor, stream or logger, or any error once Ray has started) stops the run cleanly with one line
(:mod:`.failures`).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
import uuid
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..cases import EditCase
from ..catalog import resolve
from ..data import load_counterfact, load_zsre
from ..general_ability import MCItem, probe_items
from ..metrics import CONSISTENCY_UNAVAILABLE
from ..scenario import Scenario
from ..storage.logger import RunLogger
from ..storage.records import BatchRecord, EditRecord, RejectedBatchRecord, WeightStatRecord, rows
from ..stream import EditStream, Event, SimClock, build_events
from .evaluation import RESTARTABLE, EvalPool
from .failures import actor_roles, first_line, stop_run
from .ray_utils import (
    PlacementError,
    evaluator_options,
    init_ray,
    on_this_node,
    placement_summary,
    release,
    start_shards,
)
from .services import Edited, EditorService, EvalRequest, Evaluator, RetentionItem

log = logging.getLogger(__name__)


def run_distributed(
    scn: Scenario,
    scenario_path: str,
    db: str | None = None,
    address: str | None = None,
    resume: str | None = None,
    console: Console | None = None,
    tag: str | None = None,
) -> str:
    """Run ``scn`` (one editing method) on Ray; returns the run id (``<name>[-<tag>]-<hex>``).
    ``resume``: a run id to continue."""
    run = Run(scn, scenario_path, db or scn.db, resume, console or Console())
    run.id = resume or "-".join([scn.name] + ([tag] if tag else []) + [uuid.uuid4().hex[:8]])
    try:
        run.setup(address)
        run.loop()
        run.finish()
    except BaseException as e:  # noqa: BLE001  (a dead actor, an error, Ctrl-C: the run is marked failed)
        raise run.failed(e) from None
    finally:
        run.release()
    return run.id


class RunState:
    """What a checkpoint holds besides the deltas and the editor's state (all small)."""

    def __init__(self):
        self.batch_id, self.version, self.eval_id = -1, 0, 0
        self.cum: dict[str, torch.Tensor] = {}  # the accumulated deltas of ``version``
        self.committed: list[int] = []  # edit ids in force, in the order they were written


class Run:
    def __init__(self, scn: Scenario, scenario_path: str, db: str, resume: str | None, console: Console):
        self.scn, self.path, self.db, self.resume, self.console = scn, str(scenario_path), db, resume, console
        self.id = ""
        self.ray = self.logger = None
        self.actors: list = []
        self.placement_group = None
        self.roles: dict[str, str] = {}
        self.state = RunState()

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self, address: str | None) -> None:
        scn = self.scn
        self.events = scenario_events(scn)  # before Ray: a stream that cannot be built fails here
        self.by_edit = {e.edit_id: e for e in self.events if e.is_edit}
        self.last_edit = max(self.by_edit, default=None)
        general = general_ability_items(scn, self.events)
        self.ray = ray = init_ray(address)
        from ..models import model_n_layers

        rt = scn.runtime  # a cluster that cannot hold the shards fails before anything is written
        shards = start_shards(
            scn.model, rt.shards, model_n_layers(scn.model), rt.gpus, rt.placement, rt.dtype
        )
        self.placement_group = shards.placement_group
        self.console.print(f"placement {rt.placement}: {placement_summary(shards)}")
        self.stream = (
            ray.remote(EditStream)
            .options(num_cpus=0)
            .remote(self.events, scn.stream.batch_size, scn.stream.window)
        )
        self.logger = ray.remote(RunLogger).options(num_cpus=0, **on_this_node()).remote(self.db)
        res = rt.editor
        self.editor = (
            ray.remote(EditorService)
            .options(num_cpus=res.cpus, num_gpus=res.gpus)
            .remote(
                scn.model,
                shards.shards,
                scn.editor.method,
                scn.editor.hparams,
                scn.editor.max_delta_norm,
                "cuda" if res.gpus else "cpu",
            )
        )
        ev = scn.evaluator
        evaluators = [
            ray.remote(Evaluator)
            .options(**evaluator_options(ev.backend, ev.tensor_parallel_size, rt.gpus), **RESTARTABLE)
            .remote(
                scn.model,
                scn.eval.rows_per_pass,
                ev.backend,
                ev.model_dump(exclude={"backend"}),
                general_items=general,
                device="cuda" if rt.gpus else "cpu",
                dtype=rt.dtype,
            )
            for _ in range(rt.evaluators)
        ]
        self.pool = EvalPool(ray, evaluators, self.console, scn.eval.max_pending)
        self.actors = [self.stream, self.logger, self.editor, *evaluators, *shards.shards]
        self.roles = actor_roles(
            {
                "stream": self.stream,
                "logger": self.logger,
                "editor": self.editor,
                **{f"evaluator {i}": h for i, h in enumerate(evaluators)},
                **{
                    f"shard {i} (layers {r.start}-{r.stop - 1})": h
                    for i, (h, r) in enumerate(zip(shards.shards, shards.ranges))
                },
            }
        )
        self.was = ray.get(
            self.logger.start_run.remote(
                self.id,
                scn.name,
                self.path,
                scn.model_dump(mode="json"),
                scn.model,
                scn.editor.method,
                resume=self.resume is not None,
            )
        )
        self.ckpt_dir = Path(self.db).parent / "checkpoints" / self.id
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._restore()

    def _restore(self) -> None:
        """Back to the last checkpoint; the rows written after it are deleted (the batches are replayed)."""
        ray, st = self.ray, self.state
        found = ray.get(
            self.logger.query.remote(
                "select batch_id, checkpoint from batches where run_id = ? and checkpoint is not null "
                "order by batch_id desc limit 1",
                [self.id],
            )
        )
        ray.get(self.logger.rollback_after.remote(self.id, found[0][0] if found else -1))
        if not found:
            self.console.print(f"resuming {self.id} ({self.was}) from its start (no checkpoint yet)")
            return
        ckpt = torch.load(found[0][1], weights_only=False)
        ray.get(self.editor.restore.remote(ckpt["deltas"], ckpt["editor"]))
        self.pool.load(ckpt["deltas"], ckpt["version"])
        ray.get(self.stream.load_state_dict.remote(ckpt["stream"]))
        st.batch_id, st.version, st.eval_id = ckpt["batch_id"], ckpt["version"], ckpt["eval_id"]
        st.cum, st.committed = ckpt["deltas"], ckpt["committed"]
        self.console.print(f"resuming {self.id} ({self.was}) after batch {st.batch_id} (its checkpoint)")

    # ---- the loop ---------------------------------------------------------------------------------
    def loop(self) -> None:
        ray, clock = self.ray, SimClock(self.scn.stream.speedup)
        self._editor_ready()
        with Progress(console=self.console, transient=True) as progress:
            bar = progress.add_task(
                f"{self.scn.editor.method} on {self.scn.model}",
                total=len(self.events),
                completed=ray.get(self.stream.state_dict.remote())["position"],
            )
            while (item := ray.get(self.stream.next_batch.remote())) is not None:
                paced = clock.wait_until(item.time if isinstance(item, Event) else item[-1].time)
                position = ray.get(self.stream.state_dict.remote())["position"]
                if isinstance(item, Event):  # an eval checkpoint: score asynchronously
                    self.evaluate(final=position == len(self.events))
                else:
                    self.edit_batch(item, paced)
                self._log_evaluations(self.pool.collect(wait=False))
                progress.update(bar, completed=position)

    def _editor_ready(self) -> None:
        """Wait for the editor actor's set-up, which on a model's first use includes its key
        statistics over the corpus (MEMIT, AlphaEdit: tens of minutes for SmolLM2 on 2 CPU cores,
        then read from ``$LME_SIM_CACHE``); say how long it took when that was more than a moment."""
        t0, method = time.perf_counter(), self.scn.editor.method
        with self.console.status(f"starting the {method} editor (first use on a model: key statistics)"):
            self.ray.get(self.editor.weight_stats.remote())
        if (waited := time.perf_counter() - t0) > 30:
            self.console.print(f"{method} editor ready after {waited / 60:.1f} min")

    def edit_batch(self, batch: list[Event], paced: float = 0.0) -> None:
        """Edit, guard, commit and log one batch; ``paced``: the seconds the stream's clock held it
        back (``stream.speedup``), logged as the batch's ``pace_wait`` timing."""
        ray, st, t0 = self.ray, self.state, time.perf_counter()
        waited = time.perf_counter()
        self._log_evaluations(self.pool.wait_for_room())  # at most eval.max_pending evaluations in flight
        waited = time.perf_counter() - waited
        result = ray.get(self.editor.edit.remote([e.case for e in batch]))
        if not isinstance(result, Edited):  # the editor undid it: no model copy has it
            ids = [e.edit_id for e in batch]
            ray.get(
                self.logger.append.remote(
                    "rejected_batches",
                    rows(
                        [
                            RejectedBatchRecord(
                                st.batch_id,
                                batch[-1].time,
                                len(batch),
                                ids,
                                result.reason,
                                dt.datetime.now(dt.timezone.utc),
                            )
                        ]
                    )["rejected_batches"],
                )
            )
            self.console.print(
                f"[yellow]rejected[/] the batch of edits {ids[0]}..{ids[-1]}: {result.reason}; "
                "the model is unchanged"
            )
            return
        st.batch_id += 1
        st.version += 1
        st.cum = {
            **st.cum,
            **{n: st.cum[n] + d if n in st.cum else d.clone() for n, d in result.deltas.items()},
        }
        st.committed += [e.edit_id for e in batch]
        checkpoint = self._checkpoint() if self._checkpoint_due(batch) else None
        timings = {
            **result.timings,
            **({"eval_wait": waited} if waited > 1e-3 else {}),
            **({"pace_wait": paced} if paced > 1e-3 else {}),
        }
        batch_row = BatchRecord(
            st.batch_id,
            st.batch_id,
            batch[-1].time,
            len(batch),
            st.version,
            time.perf_counter() - t0,
            timings,
            checkpoint,
        )
        ray.get(
            self.logger.commit_batch.remote(
                self.id, rows([batch_row])["batches"][0], rows(self._batch_records(batch, result))
            )
        )
        self.pool.follow(result.deltas, st.version, st.cum)

    def _checkpoint_due(self, batch: list[Event]) -> bool:
        """Every ``checkpoint_every`` batches, and after the stream's last edit."""
        return (self.state.batch_id + 1) % self.scn.checkpoint_every() == 0 or batch[
            -1
        ].edit_id == self.last_edit

    def _checkpoint(self) -> str:
        """Deltas, editor state and stream position, written before the batch's rows (atomically)."""
        st, ray = self.state, self.ray
        path = self.ckpt_dir / f"batch-{st.batch_id:06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "deltas": st.cum,
                "editor": ray.get(self.editor.state_dict.remote()),
                "stream": ray.get(self.stream.state_dict.remote()),
                "committed": st.committed,
                "batch_id": st.batch_id,
                "version": st.version,
                "eval_id": st.eval_id,
            },
            tmp,
        )
        tmp.rename(path)
        for old in sorted(self.ckpt_dir.glob("batch-*.pt"))[:-2]:  # keep the last two
            old.unlink()
        return str(path)

    def _batch_records(self, batch: list[Event], result: Edited) -> list:
        st = self.state
        modules = sorted(result.deltas)
        norm = {m: float(d.norm()) for m, d in result.deltas.items()}
        touched = result.touched or [modules] * len(batch)
        edits = [
            EditRecord(
                e.edit_id,
                st.batch_id,
                st.batch_id,
                e.time,
                e.kind,
                e.case.case_id,
                e.fact_key,
                e.case.subject,
                e.case.relation,
                e.case.prompt,
                e.case.target_new,
                e.case.target_true,
                e.supersedes,
                sorted(mods),
                [norm.get(m, 0.0) for m in sorted(mods)],
            )
            for e, mods in zip(batch, touched)
        ]
        stats = [
            WeightStatRecord(
                st.batch_id,
                st.version,
                w["module"],
                w["frobenius"],
                w["spectral"],
                w["condition"],
                norm.get(w["module"], 0.0),
                w["cum_delta_norm"],
            )
            for w in result.weight_stats
        ]
        return edits + stats

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, final: bool) -> None:
        """Submit an evaluation of the current version: a uniform sample of ``eval.retention_sample`` of
        the edits so far (``final``: all of them)."""
        st, spec = self.state, self.scn.eval
        st.eval_id += 1
        latest = self._latest()
        ids = st.committed
        if not final and len(ids) > spec.retention_sample:
            ids = sorted(random.Random(st.eval_id).sample(ids, spec.retention_sample))
        facts = list(latest.values())
        if not final and len(facts) > spec.retention_sample:
            if len(facts) == len(st.committed):  # one edit per fact: the sampled edits' facts, which
                # share their prompts with the edits' probes (one pass for both, scoring.score_by_prompt)
                keys = {self.by_edit[i].fact_key for i in ids}
                facts = [r for k, r in latest.items() if k in keys]
            else:
                facts = random.Random(-st.eval_id).sample(facts, spec.retention_sample)
        recent = (
            [self.by_edit[i].case.prompt for i in st.committed[-spec.fluency_prompts :]]
            if spec.fluency_prompts
            else []
        )
        self.pool.submit(
            EvalRequest(
                eval_id=st.eval_id,
                step=st.batch_id,
                retention=facts,
                cases=[self.by_edit[i].case for i in ids],
                n_edits=len(st.committed),
                fluency_prompts=recent,
                generative=spec.generative,
            )
        )

    def _latest(self) -> dict[str, RetentionItem]:
        """Each edited fact's latest value and the values it had before (from the committed edits)."""
        latest: dict[str, RetentionItem] = {}
        for i in self.state.committed:
            e = self.by_edit[i]
            prev = latest.get(e.fact_key)
            earlier = (
                prev.earlier + [prev.value] if prev else ([e.case.target_true] if e.case.target_true else [])
            )
            latest[e.fact_key] = RetentionItem(i, e.case.prompt, e.case.target_new, earlier)
        return latest

    def _log_evaluations(self, results: list) -> None:
        for out in results:
            found = rows(out.probes + out.metrics)
            for table in ("probes", "metrics"):
                if found.get(table):
                    self.ray.get(self.logger.append.remote(table, found[table]))

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """The last evaluations, the run marked finished, and its summary (read back once the
        logger has closed the database)."""
        from ..analysis import comparison_table

        self._log_evaluations(self.pool.collect(wait=True))
        self.ray.get(self.logger.finish_run.remote(self.id))
        self.ray.get(self.logger.close.remote())
        self.console.print(comparison_table(self.db, [self.id]))
        self.console.print(CONSISTENCY_UNAVAILABLE)
        self.console.print(
            f'DuckDB: {Path(self.db).resolve()}   e.g.  lme-sim query "select count(*) from edits" '
            f"--db {self.db}"
        )

    def failed(self, e: BaseException) -> BaseException:
        """What to raise for ``e``: a :class:`PlacementError` as it is (nothing was written yet), anything
        else as one :class:`RunFailed` line."""
        if isinstance(e, PlacementError):
            return e
        hint = f"lme-sim run {self.path} --resume {self.id}" + (
            f" --db {self.db}" if self.db != self.scn.db else ""
        )
        return stop_run(self.ray, e, self.logger, self.id, self.roles, hint, Path(self.db).parent / "logs")

    def release(self) -> None:
        if self.ray is not None and self.actors:
            try:
                release(self.actors, self.placement_group)
            except Exception as e:  # some actors or the placement group may be left in this Ray
                log.warning(
                    "run %s: could not release all of its actors and their placement group (%s)",
                    self.id,
                    first_line(e),
                )
            self.actors = []


def scenario_cases(scn: Scenario, world) -> list[EditCase]:
    d = scn.data
    if d.kind == "world":
        return world.edit_cases(d.n_edits, seed=d.seed)
    path = d.path if d.path is not None else resolve(d.source)  # a named dataset: its downloaded file
    drawn = scn.seeds is not None  # a run of a seeded study: n_edits cases of the whole file, seed's order
    limit = None if drawn else d.n_edits
    if d.kind == "counterfact":
        cases = load_counterfact(path, limit=limit)
    else:
        cases = load_zsre(path, target=d.zsre_target, limit=limit)
    return random.Random(d.seed).sample(cases, min(d.n_edits, len(cases))) if drawn else cases


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
