"""A run that loses an actor it cannot do without stops cleanly, ready for ``--resume``.

The shards and the editor hold the run's model state (edited weights, editor state), the stream
its position, the logger its database: when one of them dies, going on would edit or log from a
wrong state. So the run stops: the batch in progress is not committed (a batch is committed in one
DuckDB transaction, after its checkpoint), the run is marked ``failed``, its actors are released,
and :class:`RunFailed` says in one line which actor died and how to resume from the last committed
batch. Evaluators are restarted instead (:mod:`lme_sim.runtime.evaluation`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A run stopped because one of its actors died; the message is one line."""


def dead_actor(exc: BaseException):
    """The ``ActorDiedError`` behind ``exc`` (also when it reached the driver through another
    actor's task, e.g. a shard that died under the editor), or None."""
    from ray.exceptions import RayActorError, RayTaskError

    while isinstance(exc, RayTaskError):
        exc = exc.cause
    return exc if isinstance(exc, RayActorError) else None


def actor_roles(handles: dict[str, object]) -> dict[str, str]:
    """``{actor id: role}`` from ``{role: actor handle}`` (how a dead actor is named in messages)."""
    return {h._actor_id.hex(): role for role, h in handles.items()}


def stop_run(ray, exc: BaseException, logger, run_id: str, roles: dict[str, str], resume_hint: str,
             release) -> BaseException:
    """Mark the run failed and release its actors (``release()``); returns what to raise: a
    :class:`RunFailed` if an actor died, else ``exc`` itself (a bug keeps its traceback)."""
    marked = True
    try:
        ray.get(logger.finish_run.remote(run_id, "failed"), timeout=60)
        ray.get(logger.close.remote(), timeout=60)
    except Exception as e:  # the logger itself is gone (or hangs): the run keeps its 'running' status
        marked = False
        log.warning("run %s: could not mark it failed and close its database through the logger actor (%s)",
                    run_id, _first_line(e))
    try:
        release()
    except Exception as e:  # some of its actors or its placement group may be left in this Ray
        log.warning("run %s: could not release all of its actors and their placement group (%s)",
                    run_id, _first_line(e))
    died = dead_actor(exc)
    if died is None:
        return exc
    role = roles.get(getattr(died, "actor_id", None), "an actor")
    why = (str(died).strip().splitlines() or ["died"])[0].rstrip(".")
    status = "marked failed" if marked else "left as 'running' (its logger died)"
    return RunFailed(f"run {run_id} stopped: the {role} actor died ({why}); the run is {status}, "
                     f"its committed batches are kept; continue it with: {resume_hint}")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception (Ray's errors carry whole tracebacks)."""
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0]}" if lines else "")
