"""A run that cannot go on stops cleanly, ready for ``--resume``.

The shards and the editor hold the run's model state (edited weights, editor state), the
logger its database: when one of them dies, going on would edit or log from a
wrong state. So the run stops: the batch in progress is not committed (a batch is committed in one
DuckDB transaction, after its checkpoint), the run is marked ``failed``, its actors are released,
and :class:`RunFailed` says in one line which actor died and how to resume from the last
checkpoint. Any other error once the run has started ends the same way (its traceback goes to a
file beside the database, named in the line), never as a traceback on the console. Evaluators are
restarted instead (:mod:`lme_sim.runtime.evaluation`).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A run stopped; the message is one line."""


def root_cause(exc: BaseException) -> BaseException:
    """The error behind Ray's wrappers: a task's exception reaches the driver as a ``RayTaskError``
    (through each actor's task it passed), whose message is Ray's header; its ``cause`` is the error."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def dead_actor(exc: BaseException):
    """The ``ActorDiedError`` behind ``exc`` (also when it reached the driver through another
    actor's task, e.g. a shard that died under the editor), or None."""
    from ray.exceptions import RayActorError

    exc = root_cause(exc)
    return exc if isinstance(exc, RayActorError) else None


def actor_roles(handles: dict[str, object]) -> dict[str, str]:
    """``{actor id: role}`` from ``{role: actor handle}`` (how a dead actor is named in messages)."""
    return {h._actor_id.hex(): role for role, h in handles.items()}


def stop_run(
    exc: BaseException,
    *,
    ray,
    logger,
    run_id: str,
    roles: dict[str, str],
    resume_hint: str,
    log_dir: Path,
) -> RunFailed:
    """Mark the run failed (where it was started) and say why in one line: the actor that died, an
    interruption, or the error (its traceback written to ``log_dir/<run_id>.error.txt``)."""
    status = "marked failed"
    if logger is None:
        status = "not started"
    else:
        try:
            ray.get(logger.finish_run.remote(run_id, "failed"), timeout=60)
        except Exception as e:  # the logger itself is gone
            log.warning(
                "run %s: could not mark it failed through the logger actor (%s)",
                run_id,
                first_line(e),
            )
            status = "left as 'running' (its logger is gone; lme-sim runs shows it as interrupted)"
    died = dead_actor(exc) if ray is not None else None
    if died is not None:
        role = roles.get(getattr(died, "actor_id", None), "an actor")
        why = (str(died).strip().splitlines() or ["died"])[0].rstrip(".")
        what = f"the {role} actor died ({why})"
    elif isinstance(exc, KeyboardInterrupt):
        what = "interrupted"
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        trace = log_dir / f"{run_id}.error.txt"
        trace.write_text("".join(traceback.format_exception(exc)))
        what = f"{first_line(root_cause(exc) if ray is not None else exc)} (traceback in {trace})"
    if logger is None:
        return RunFailed(f"run {run_id} could not start: {what}")
    return RunFailed(
        f"run {run_id} stopped: {what}; the run is {status}, its committed batches are kept; "
        f"continue it with: {resume_hint}"
    )


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception (Ray's errors carry whole tracebacks)."""
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0]}" if lines else "")
