"""The coordinator: one run of one editing method, as a run object read top to bottom, and a study
of runs at once.

A run is five calls: :meth:`Run.prepare` (the stream's events, before Ray), :meth:`Run.start` (the
actors in the run's placement group, the run row or the state to resume), :meth:`Run.loop` (every
batch through the editor, every eval checkpoint to the evaluators), :meth:`Run.finish` (the last
evaluations) and :meth:`Run.release`. :func:`run_study` runs a study's runs (:mod:`.study`), as many
at once as ``runtime.concurrent_runs`` says, each in a thread of the driver, all logging through one
logger actor (one DuckDB file, one writer; every row carries its ``run_id``); a run that fails is
marked failed and the others go on. :func:`run_distributed` is a study of one run.

Per batch the editor actor writes the batch through the shard actors; its rows (the batch, its
edits, the weight health of every edited matrix) are committed to DuckDB in one transaction, and
every ``runtime.checkpoint_every`` batches the accumulated deltas, the editor's state and the stream
position are checkpointed first (between checkpoints no editor state is shipped or written).
Evaluators receive only the changed tensors with the new version and score asynchronously; each
probe row carries the batch_id of the model it scored. ``--resume`` restarts from the newest checkpoint
whose evaluations all landed and replays the batches after it from the stream, replacing their rows:
no edit or evaluation is lost or written twice.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..cases import EditCase
from ..catalog import resolve
from ..data import load_counterfact, load_zsre
from ..general_ability import MCItem, probe_items
from ..metrics import CONSISTENCY_UNAVAILABLE
from ..scenario import Scenario
from ..storage.records import rows
from ..stream import EditStream, Event, SimClock, build_events
from .board import Board
from .evaluation import RESTARTABLE, EvalPool, eval_request
from .failures import actor_roles, dead_actor, first_line, stop_run
from .ledger import Checkpoint, Checkpoints, RunState, batch_row, batch_rows, rejected_row
from .ray_utils import (
    PlacementError,
    actor_device,
    editor_options,
    evaluator_options,
    in_group,
    init_ray,
    placement_summary,
    release,
    run_bundles,
    start_logger,
    start_shards,
)
from .services import Edited, EditorService, Evaluator
from .shards import ShardedBackbone, split_layers
from .study import StudyRun, concurrent_runs, new_study_hex, run_demand, run_id

log = logging.getLogger(__name__)

# with no bar drawn (output to a file), at most this long between progress lines while editing
PROGRESS_LINE_S = 300.0


def run_distributed(
    scn: Scenario,
    scenario_path: str,
    *,
    db: str | None = None,
    address: str | None = None,
    resume: str | None = None,
    console: Console | None = None,
    tag: str | None = None,
) -> str:
    """Run ``scn`` (one editing method) on Ray; returns the run id (``<name>[-<tag>]-<hex>``).
    ``resume``: a run id to continue. A run that stops raises its :class:`RunFailed` (or
    :class:`PlacementError`)."""
    rid = resume or run_id(scn.name, tag, new_study_hex())
    outcome = run_study(
        [StudyRun(scn, rid, resume is not None)], scenario_path, db=db, address=address, console=console
    )
    if outcome[rid] is not None:
        raise outcome[rid]
    return rid


def run_study(
    runs: list[StudyRun],
    scenario_path: str,
    *,
    db: str | None = None,
    address: str | None = None,
    console: Console | None = None,
) -> dict[str, BaseException | None]:
    """Run a study's ``runs`` (of one scenario), ``runtime.concurrent_runs`` at once, all logging to
    ``db`` through one logger actor; a live table shows each run's progress on a terminal. Returns each
    run's outcome by id: None (finished), or the :class:`RunFailed` / :class:`PlacementError` it stopped
    with (marked failed; the other runs went on). Prints the summary of the finished runs."""
    console, db = console or Console(), db or runs[0].scn.db
    board, stop = Board(console), threading.Event()
    study = StudyContext(scenario_path=str(scenario_path), db=db, console=console, board=board, stop=stop)
    outcome: dict[str, BaseException | None] = {}
    ready = []
    for r in runs:
        run = Run(r, study)
        try:
            run.prepare()  # before Ray: a stream that cannot be built fails here
            ready.append(run)
        except Exception as e:  # noqa: BLE001  (nothing was started or written)
            outcome[run.id] = run.failed(e)
    if ready:
        ray = init_ray(address)
        demands = [run_demand(r.scn.runtime, r.scn.evaluator) for r in ready]
        demand = {k: max(d.get(k, 0.0) for d in demands) for d in demands for k in d}
        at_once = concurrent_runs(
            ready[0].scn.runtime.concurrent_runs, ray.available_resources(), demand, len(ready)
        )
        if len(ready) > 1:
            console.print(f"{len(ready)} runs, {at_once} at a time (runtime.concurrent_runs)")
        logger = start_logger(db)
        try:
            with board, ThreadPoolExecutor(at_once, thread_name_prefix="run") as threads:
                futures = [threads.submit(run.execute, ray, logger) for run in ready]
                try:
                    wait(futures)
                except KeyboardInterrupt:  # every run stops now, marked failed ("interrupted")
                    stop.set()
                    for run in ready:
                        run.release()  # its calls in flight fail at once; committed batches are kept
                    wait(futures)
            outcome.update({run.id: f.result() for run, f in zip(ready, futures)})
        finally:
            close_logger(ray, logger)
    if finished := [r.run_id for r in runs if outcome[r.run_id] is None]:
        summary(console, db, finished)
    return {r.run_id: outcome[r.run_id] for r in runs}


def close_logger(ray, logger) -> None:
    """Flush and close the study's database, and stop its logger actor (one that died: nothing to do,
    the failed runs said so)."""
    try:
        ray.get(logger.close.remote(), timeout=60)
        ray.kill(logger)
    except Exception as e:  # noqa: BLE001
        if dead_actor(e) is None:
            log.warning("could not close the database through the logger actor (%s)", first_line(e))


def summary(console: Console, db: str, run_ids: list[str]) -> None:
    """The finished runs' final metrics (read once the logger has closed the database)."""
    from ..analysis import comparison_table

    console.print(comparison_table(db, run_ids))
    console.print(CONSISTENCY_UNAVAILABLE)
    console.print(
        f'DuckDB: {Path(db).resolve()}   e.g.  lme-sim query "select count(*) from edits" --db {db}'
    )


@dataclass(frozen=True, kw_only=True)
class StudyContext:
    """What the runs of a study share: the scenario file, the database, the console and its live
    board, and the flag that Ctrl-C sets."""

    scenario_path: str
    db: str
    console: Console
    board: Board
    stop: threading.Event


class Run:
    def __init__(self, run: StudyRun, study: StudyContext):
        self.scn, self.id, self.resume = run.scn, run.run_id, run.resume
        self.path, self.db, self.console = study.scenario_path, study.db, study.console
        self.board, self.stop = study.board, study.stop
        self._releasing = threading.Lock()
        self.ray = self.logger = self.actors = None
        self.state = RunState()
        self.landed: set[int] = set()  # the eval_ids whose rows are written

    def execute(self, ray, logger) -> BaseException | None:
        """Start, loop and finish (in a thread of the study); None, or the error the run stopped with."""
        try:
            self.start(ray, logger)
            self.loop()
            self.finish()
            return None
        except BaseException as e:  # noqa: BLE001  (a dead actor, an error, Ctrl-C: the run is marked failed)
            return self.failed(e)
        finally:
            self.release()

    # ---- set-up -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The stream's events and the multiple-choice set (no Ray yet)."""
        scn = self.scn
        self.events = scenario_events(scn)
        self.stream = EditStream(self.events, scn.stream.batch_size, scn.stream.window)  # replayed here
        self.by_edit = {e.edit_id: e for e in self.events if e.is_edit}
        self.last_edit = max(self.by_edit, default=None)
        self.general = general_ability_items(scn, self.events)
        self.board.add(self.id, f"{scn.editors[0].label()} on {scn.model}", len(self.events))

    def start(self, ray, logger) -> None:
        """The run's actors in its placement group, its row in ``runs`` (or the state it resumes)."""
        scn = self.scn
        self.board.update(self.id, status="starting")
        self.ray = ray
        self.actors = Actors.start(self.ray, scn, self.general, self.console, logger)
        self.logger, self.editor = logger, self.actors.editor
        self.pool = EvalPool(self.ray, self.actors.evaluators, self.console, scn.eval.max_pending)
        self.was = self.ray.get(  # the run's status before (a resumed run's: failed or interrupted)
            self.logger.start_run.remote(
                self.id, scn.model_dump(mode="json"), scenario_path=self.path, resume=self.resume
            )
        )
        self.checkpoints = Checkpoints(Path(self.db).parent / "checkpoints" / self.id)
        if self.resume:
            self._restore()

    def _restore(self) -> None:
        """Back to the newest checkpoint whose evaluations all landed (:meth:`Checkpoints.resume_from`);
        the rows written after it are deleted (the batches and their evaluations are replayed)."""
        landed = self.ray.get(self.logger.landed_evaluations.remote(self.id))
        found = self.ray.get(self.logger.checkpoints.remote(self.id))
        ckpt = self.checkpoints.resume_from(found, landed)
        self.ray.get(self.logger.rollback_after.remote(self.id, ckpt.state.batch_id if ckpt else -1))
        if ckpt is None:
            why = "no checkpoint yet" if not found else "no checkpoint with all its evaluations written"
            self.console.print(f"resuming {self.id} ({self.was}) from its start ({why})")
            return
        self.landed = {i for i in landed if i <= ckpt.state.eval_id}
        self.ray.get(self.editor.restore.remote(ckpt.state.cum, ckpt.editor))
        self.pool.load(ckpt.state.cum, ckpt.state.version)
        self.stream.load_state_dict(ckpt.stream)
        self.state = ckpt.state
        later = "; evaluations after it were in flight, redone" if ckpt.state.batch_id < found[0][0] else ""
        self.console.print(
            f"resuming {self.id} ({self.was}) after batch {self.state.batch_id} (its checkpoint{later})"
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def loop(self) -> None:
        clock = SimClock(self.scn.stream.speedup)
        self._editor_ready()
        self._started = time.perf_counter()
        self.board.update(
            self.id, status="editing", position=self.stream.position, edits=len(self.state.committed)
        )
        while (step := self.stream.next_batch()) is not None:
            if self.stop.is_set():  # Ctrl-C in the study's driver
                raise KeyboardInterrupt
            paced = clock.wait_until(step.time)
            if step.is_eval:  # score asynchronously
                self.evaluate(final=step.position == len(self.events))
                self._progress_line(step.position)
            else:
                self.edit_batch(step.events, paced)
                self._progress_line(step.position, every_s=PROGRESS_LINE_S)
            self._log_evaluations(self.pool.collect(wait=False))
            self.board.update(self.id, position=step.position, edits=len(self.state.committed))

    def _progress_line(self, position: int, every_s: float = 0.0) -> None:
        """Where no bar is drawn (output to a file, e.g. a run under nohup): one line per evaluation,
        and one after a batch when ``every_s`` seconds passed since the last line (a run one edit at a
        time goes hours between evaluations), with the edits committed and the seconds per edit since
        the last line."""
        if self.console.is_terminal:
            return
        now, n = time.perf_counter(), len(self.state.committed)
        last_t, last_n = getattr(self, "_last_line", (self._started, 0))
        if now - last_t < every_s:
            return
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
        self.board.update(self.id, status="starting the editor (first use on a model: key statistics)")
        self.ray.get(self.editor.weight_stats.remote())
        if (waited := time.perf_counter() - t0) > 30:
            self.console.print(f"{self.id}: {method} editor ready after {waited / 60:.1f} min")

    def edit_batch(self, batch: list[Event], paced: float = 0.0) -> None:
        """Edit, guard, commit and log one batch; ``paced``: the seconds the stream's clock held it
        back (``stream.speedup``), logged as the batch's ``pace_wait`` timing."""
        ray, st, t0 = self.ray, self.state, time.perf_counter()
        self._log_evaluations(self.pool.wait_for_room())  # at most eval.max_pending evaluations in flight
        waited = time.perf_counter() - t0
        result = ray.get(self.editor.edit.remote([e.case for e in batch]))
        if not isinstance(result, Edited):  # the editor undid it: no model copy has it
            row = rejected_row(batch, result.reason, st)
            ray.get(self.logger.append.remote("rejected_batches", [row], run_id=self.id))
            ids = [e.edit_id for e in batch]
            self.console.print(
                f"{self.id}: [yellow]rejected[/] the batch of edits {ids[0]}..{ids[-1]}: {result.reason}; "
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
        """Write the evaluations that finished; the checkpoints a resume no longer needs are deleted."""
        for out in results:
            found = rows(out.probes + out.metrics)
            for table in ("probes", "metrics"):
                if found.get(table):
                    self.ray.get(self.logger.append.remote(table, found[table], run_id=self.id))
            self.landed.add(out.eval_id)
        if results:  # written now, so that a checkpoint is deleted only once a resume cannot need it
            self.ray.get(self.logger.flush.remote())
            self.checkpoints.prune(self.landed)

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """The last evaluations and the run marked finished (its rows flushed)."""
        self.board.update(self.id, status="last evaluations")
        self._log_evaluations(self.pool.collect(wait=True))
        self.ray.get(self.logger.finish_run.remote(self.id))
        self.board.update(self.id, status="finished")

    def failed(self, e: BaseException) -> BaseException:
        """What to raise for ``e``: a :class:`PlacementError` as it is (nothing was written yet), anything
        else as one :class:`RunFailed` line."""
        self.board.update(self.id, status="failed")
        if isinstance(e, PlacementError):
            return e
        if self.stop.is_set():  # Ctrl-C: its actors were stopped under it
            e = KeyboardInterrupt()
        hint = f"lme-sim run {self.path} --resume {self.id}" + (
            f" --db {self.db}" if self.db != self.scn.db else ""
        )
        roles = self.actors.roles() if self.actors else {}
        return stop_run(
            e,
            ray=self.ray,
            logger=self.logger,
            run_id=self.id,
            roles=roles,
            resume_hint=hint,
            log_dir=Path(self.db).parent / "logs",
        )

    def release(self) -> None:
        """Stop the run's actors and free its placement group (once, from whichever thread comes first)."""
        with self._releasing:
            actors, self.actors = self.actors, None
        if self.ray is not None and actors is not None:
            try:
                release(actors.handles(), actors.shards.placement_group)
            except Exception as e:  # some actors or the placement group may be left in this Ray
                log.warning(
                    "run %s: could not release all of its actors and their placement group (%s)",
                    self.id,
                    first_line(e),
                )


@dataclass
class Actors:
    """A run's Ray actors, each a thin shell around a plain class: the logger (on this node), the
    editor, the evaluators (restartable) and the model's shards."""

    logger: object
    editor: object
    evaluators: list
    shards: ShardedBackbone

    @classmethod
    def start(cls, ray, scn: Scenario, general: list[MCItem], console, logger) -> Actors:
        """Start them in the run's placement group (its shards' bundles, then those of the evaluators
        and the editor where they reserve resources); a cluster that cannot hold the group fails first,
        before anything is written. ``logger``: the study's."""
        from ..models import model_n_layers

        rt, ev = scn.runtime, scn.evaluator
        ev_opts = evaluator_options(ev.backend, ev.tensor_parallel_size, rt.gpus)
        ed_opts = editor_options(rt.editor.cpus, rt.editor.gpus)
        # an editor with a GPU takes one the shards' group left free (tests/test_gpu_placement.py); the
        # study's count of what a run needs (study.run_demand) includes it all the same
        in_run = [ev_opts] * rt.evaluators + ([] if rt.editor.gpus else [ed_opts])
        more, where = run_bundles(rt.shards, in_run)
        shards = start_shards(
            scn.model,
            split_layers(model_n_layers(scn.model), rt.shards, rt.cuts),
            gpus=rt.gpus,
            strategy=rt.placement,
            dtype=rt.dtype,
            more=more,
        )
        pg = shards.placement_group
        console.print(f"placement {rt.placement}: {placement_summary(shards)}")
        editor = (
            ray.remote(EditorService)
            .options(**ed_opts, **({} if rt.editor.gpus else in_group(pg, where[-1])))
            .remote(
                scn.model,
                shards.shards,
                scn.editor,
                device=actor_device(rt.editor.gpus),
                pipeline=rt.pipeline,
            )
        )
        evaluators = [
            ray.remote(Evaluator)
            .options(**ev_opts, **RESTARTABLE, **in_group(pg, where[i]))
            .remote(
                scn.model,
                ev,
                rows_per_pass=scn.eval.rows_per_pass,
                general_items=general,
                device=actor_device(rt.gpus),
                dtype=rt.dtype,
            )
            for i in range(rt.evaluators)
        ]
        return cls(logger, editor, evaluators, shards)

    def handles(self) -> list:
        """The run's own actors (the logger is the study's)."""
        return [self.editor, *self.evaluators, *self.shards.shards]

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
