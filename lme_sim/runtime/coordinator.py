"""The coordinator: one run of one editing method, as a run object read top to bottom.

``run_distributed`` is four calls: :meth:`Run.setup` (the stream's events, Ray, the actors, the run
row or the state to resume), :meth:`Run.loop` (every batch through the editor, every eval checkpoint
to the evaluators), :meth:`Run.finish` (the last evaluations, the summary) and :meth:`Run.release`.

Per batch the editor actor writes the batch through the shard actors; its rows (the batch, its
edits, the weight health of every edited matrix) are committed to DuckDB in one transaction, and
every ``runtime.checkpoint_every`` batches the accumulated deltas, the editor's state and the stream
position are checkpointed first (between checkpoints no editor state is shipped or written).
Evaluators receive only the changed tensors with the new version and score asynchronously; each
probe row carries the batch_id of the model it scored. ``--resume`` restarts from the last checkpoint and
replays the batches after it from the stream, replacing their rows: no edit is lost or written twice.

What the run writes down (its state, checkpoints and rows) is :mod:`.ledger`'s; what an evaluation
scores, :mod:`.evaluation`'s; its final metrics, :func:`lme_sim.analysis.summary_rows`.

Faults: a batch whose deltas fail the delta guard is undone and logged in ``rejected_batches``;
a dead evaluator is restarted and re-synced (:mod:`.evaluation`); anything else (a dead shard,
editor or logger, or any error once Ray has started) stops the run cleanly with one line
(:mod:`.failures`).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from ..cases import EditCase
from ..catalog import resolve
from ..data import load_counterfact, load_zsre
from ..general_ability import MCItem, probe_items
from ..metrics import CONSISTENCY_UNAVAILABLE
from ..scenario import Scenario
from ..storage.logger import RunLogger
from ..storage.records import rows
from ..stream import EditStream, Event, SimClock, build_events
from .evaluation import RESTARTABLE, EvalPool, eval_request
from .failures import actor_roles, first_line, stop_run
from .ledger import Checkpoint, Checkpoints, RunState, batch_row, batch_rows, rejected_row
from .ray_utils import (
    PlacementError,
    actor_device,
    editor_options,
    evaluator_options,
    init_ray,
    on_this_node,
    placement_summary,
    release,
    start_shards,
)
from .services import Edited, EditorService, Evaluator
from .shards import ShardedBackbone

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


class Run:
    def __init__(self, scn: Scenario, scenario_path: str, db: str, resume: str | None, console: Console):
        self.scn, self.path, self.db, self.resume, self.console = scn, str(scenario_path), db, resume, console
        self.id = ""
        self.ray = self.logger = self.actors = None
        self.state = RunState()

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self, address: str | None) -> None:
        scn = self.scn
        self.events = scenario_events(scn)  # before Ray: a stream that cannot be built fails here
        self.stream = EditStream(self.events, scn.stream.batch_size, scn.stream.window)  # replayed here
        self.by_edit = {e.edit_id: e for e in self.events if e.is_edit}
        self.last_edit = max(self.by_edit, default=None)
        general = general_ability_items(scn, self.events)
        self.ray = init_ray(address)
        self.actors = Actors.start(self.ray, scn, general, self.db, self.console)
        self.logger, self.editor = self.actors.logger, self.actors.editor
        self.pool = EvalPool(self.ray, self.actors.evaluators, self.console, scn.eval.max_pending)
        self.was = self.ray.get(  # the run's status before (a resumed run's: failed or interrupted)
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
        self.checkpoints = Checkpoints(Path(self.db).parent / "checkpoints" / self.id)
        if self.resume:
            self._restore()

    def _restore(self) -> None:
        """Back to the last checkpoint; the rows written after it are deleted (the batches are replayed)."""
        found = self.ray.get(self.logger.last_checkpoint.remote(self.id))
        self.ray.get(self.logger.rollback_after.remote(self.id, found[0] if found else -1))
        if not found:
            self.console.print(f"resuming {self.id} ({self.was}) from its start (no checkpoint yet)")
            return
        ckpt = Checkpoint.load(found[1])
        self.ray.get(self.editor.restore.remote(ckpt.state.cum, ckpt.editor))
        self.pool.load(ckpt.state.cum, ckpt.state.version)
        self.stream.load_state_dict(ckpt.stream)
        self.state = ckpt.state
        self.console.print(
            f"resuming {self.id} ({self.was}) after batch {self.state.batch_id} (its checkpoint)"
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def loop(self) -> None:
        clock = SimClock(self.scn.stream.speedup)
        self._editor_ready()
        self._started = time.perf_counter()
        with Progress(console=self.console, transient=True) as progress:
            bar = progress.add_task(
                f"{self.scn.editor.method} on {self.scn.model}",
                total=len(self.events),
                completed=self.stream.position,
            )
            while (step := self.stream.next_batch()) is not None:
                paced = clock.wait_until(step.time)
                if step.is_eval:  # score asynchronously
                    self.evaluate(final=step.position == len(self.events))
                    self._progress_line(step.position)
                else:
                    self.edit_batch(step.events, paced)
                self._log_evaluations(self.pool.collect(wait=False))
                progress.update(bar, completed=step.position)

    def _progress_line(self, position: int) -> None:
        """Where no bar is drawn (output to a file, e.g. a run under nohup): one line per evaluation,
        with the edits committed and the seconds per edit since the last line."""
        if self.console.is_terminal:
            return
        now, n = time.perf_counter(), len(self.state.committed)
        last_t, last_n = getattr(self, "_last_line", (self._started, 0))
        rate = f", {(now - last_t) / (n - last_n):.2f} s per edit since the last line" if n > last_n else ""
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {self.id}: {n} edits committed, event {position} of "
            f"{len(self.events)}{rate}"
        )
        self._last_line = (now, n)

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
        self._log_evaluations(self.pool.wait_for_room())  # at most eval.max_pending evaluations in flight
        waited = time.perf_counter() - t0
        result = ray.get(self.editor.edit.remote([e.case for e in batch]))
        if not isinstance(result, Edited):  # the editor undid it: no model copy has it
            ray.get(self.logger.append.remote("rejected_batches", [rejected_row(batch, result.reason, st)]))
            ids = [e.edit_id for e in batch]
            self.console.print(
                f"[yellow]rejected[/] the batch of edits {ids[0]}..{ids[-1]}: {result.reason}; "
                "the model is unchanged"
            )
            return
        st.commit(batch, result.deltas)
        checkpoint = self._checkpoint() if self._checkpoint_due(batch) else None
        timings = {
            **result.timings,
            **({"eval_wait": waited} if waited > 1e-3 else {}),
            **({"pace_wait": paced} if paced > 1e-3 else {}),
        }
        row = batch_row(batch, st, seconds=time.perf_counter() - t0, timings=timings, checkpoint=checkpoint)
        ray.get(self.logger.commit_batch.remote(self.id, row, batch_rows(batch, result, st)))
        self.pool.follow(result.deltas, st.version, st.cum)

    def _checkpoint_due(self, batch: list[Event]) -> bool:
        """Every ``checkpoint_every`` batches, and after the stream's last edit."""
        every = self.scn.checkpoint_every()
        return (self.state.batch_id + 1) % every == 0 or batch[-1].edit_id == self.last_edit

    def _checkpoint(self) -> str:
        """Deltas, editor state and stream position, written before the batch's rows (atomically)."""
        editor = self.ray.get(self.editor.state_dict.remote())
        return self.checkpoints.write(Checkpoint(self.state, editor=editor, stream=self.stream.state_dict()))

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, final: bool) -> None:
        """Submit the next evaluation of the current version (``final``: of every edit)."""
        self.state.eval_id += 1
        self.pool.submit(eval_request(self.state, self.by_edit, self.scn.eval, final=final))

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
        roles = self.actors.roles() if self.actors else {}
        return stop_run(self.ray, e, self.logger, self.id, roles, hint, Path(self.db).parent / "logs")

    def release(self) -> None:
        if self.ray is not None and self.actors is not None:
            try:
                release(self.actors.handles(), self.actors.shards.placement_group)
            except Exception as e:  # some actors or the placement group may be left in this Ray
                log.warning(
                    "run %s: could not release all of its actors and their placement group (%s)",
                    self.id,
                    first_line(e),
                )
            self.actors = None


@dataclass
class Actors:
    """A run's Ray actors, each a thin shell around a plain class: the logger (on this node), the
    editor, the evaluators (restartable) and the model's shards."""

    logger: object
    editor: object
    evaluators: list
    shards: ShardedBackbone

    @classmethod
    def start(cls, ray, scn: Scenario, general: list[MCItem], db: str, console) -> Actors:
        """Start them; a cluster that cannot hold the shards fails first, before anything is written."""
        from ..models import model_n_layers

        rt, ev = scn.runtime, scn.evaluator
        shards = start_shards(
            scn.model, rt.shards, model_n_layers(scn.model), rt.gpus, rt.placement, rt.dtype
        )
        console.print(f"placement {rt.placement}: {placement_summary(shards)}")
        logger = ray.remote(RunLogger).options(num_cpus=0, **on_this_node()).remote(db)
        editor = (
            ray.remote(EditorService)
            .options(**editor_options(rt.editor.cpus, rt.editor.gpus))
            .remote(
                scn.model,
                shards.shards,
                scn.editor.method,
                scn.editor.hparams,
                scn.editor.max_delta_norm,
                actor_device(rt.editor.gpus),
                rt.pipeline,
            )
        )
        evaluators = [
            ray.remote(Evaluator)
            .options(**evaluator_options(ev.backend, ev.tensor_parallel_size, rt.gpus), **RESTARTABLE)
            .remote(
                scn.model,
                scn.eval.rows_per_pass,
                ev.backend,
                ev.model_dump(exclude={"backend"}),
                general_items=general,
                device=actor_device(rt.gpus),
                dtype=rt.dtype,
            )
            for _ in range(rt.evaluators)
        ]
        return cls(logger, editor, evaluators, shards)

    def handles(self) -> list:
        return [self.logger, self.editor, *self.evaluators, *self.shards.shards]

    def roles(self) -> dict[str, str]:
        """``{actor id: role}``: how a dead actor is named in the line that stops the run."""
        return actor_roles(
            {
                "logger": self.logger,
                "editor": self.editor,
                **{f"evaluator {i}": h for i, h in enumerate(self.evaluators)},
                **{
                    f"shard {i} (layers {r.start}-{r.stop - 1})": h
                    for i, (h, r) in enumerate(zip(self.shards.shards, self.shards.ranges))
                },
            }
        )


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
    from ..models import model_kind

    world = model_kind(scn.model).world(scn.model) if not spec.path else None
    edited = {(e.case.subject, e.case.relation) for e in events if e.case is not None}
    return probe_items(spec.n, spec.path, world, edited, seed=scn.data.seed)
