"""Evaluations on evaluator actors, kept exact when an evaluator dies and Ray restarts it.

Evaluator actors are restartable: Ray re-runs the constructor (a fresh replica at version 0) and
sends the calls that were in flight again. A replica only applies a delta on top of the version
before it, and every evaluation names the version it is for, so a restarted replica answers
"behind" instead of scoring the wrong model. :class:`EvalPool` then loads into it the model
state that evaluation was for (the accumulated deltas, kept while the evaluation is pending),
submits it again under the same eval id, and brings the replica to the current version: every
eval id is scored exactly once, on its own version. An evaluator that dies more often than
``EVALUATOR_RESTARTS`` times fails the run (see :mod:`lme_sim.runtime.failures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EVALUATOR_RESTARTS = 3  # per evaluator and run
# what the evaluator actors are created with: restart them, and retry calls that were in flight
RESTARTABLE = {"max_restarts": EVALUATOR_RESTARTS, "max_task_retries": -1}


@dataclass
class _Pending:
    ref: object
    evaluator: int
    args: tuple  # eval_id, step, retention probes, recent cases
    version: int
    cum: dict[str, torch.Tensor]  # the accumulated deltas of ``version``
    resyncs: int = 0


class EvalPool:
    """Submits evaluations round-robin, forwards deltas, and collects results in any order."""

    def __init__(self, ray, evaluators: list, console=None):
        self.ray, self.evaluators, self.console = ray, evaluators, console
        self.pending: list[_Pending] = []
        self.version, self.cum = 0, {}

    def submit(self, eval_id: int, step: int, retention: list[dict], recent: list) -> None:
        """Score the current version (the one of the last :meth:`apply` or :meth:`load`)."""
        i = eval_id % len(self.evaluators)
        args = (eval_id, step, retention, recent)
        ref = self.evaluators[i].evaluate.remote(*args, version=self.version)
        self.pending.append(_Pending(ref, i, args, self.version, self.cum))

    def apply(self, deltas: dict[str, torch.Tensor], version: int, cum: dict[str, torch.Tensor]) -> None:
        """Send a batch's deltas to every evaluator (queued behind any evaluation in flight, so
        versions stay ordered); ``cum``: the accumulated deltas of ``version``."""
        for ev in self.evaluators:
            ev.apply.remote(deltas, version)
        self.version, self.cum = version, dict(cum)

    def load(self, cum: dict[str, torch.Tensor], version: int) -> None:
        """Put every evaluator at an absolute state (resuming a run) and wait for it."""
        self.ray.get([ev.load.remote(cum, version) for ev in self.evaluators])
        self.version, self.cum = version, dict(cum)

    def collect(self, wait: bool) -> list[dict]:
        """Results of the finished evaluations (all of them with ``wait``); an evaluator found
        behind is re-synced and its evaluation submitted again."""
        results = []
        while self.pending:
            refs = [p.ref for p in self.pending]
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
            done = set(done)
            for p in [p for p in self.pending if p.ref in done]:
                out = self.ray.get(p.ref)  # an evaluator dead for good raises here: the run fails
                if "behind" in out:
                    self._resync(p, out["behind"])
                else:
                    self.pending.remove(p)
                    results.append(out)
            if not wait:
                break
        return results

    def _resync(self, p: _Pending, at: int) -> None:
        p.resyncs += 1
        if p.resyncs > EVALUATOR_RESTARTS + 1:
            raise RuntimeError(f"evaluator {p.evaluator} keeps losing its replica (evaluation {p.args[0]})")
        ev = self.evaluators[p.evaluator]
        if self.console is not None:
            self.console.print(f"evaluation {p.args[0]}: evaluator {p.evaluator} was restarted (its replica was "
                               f"at version {at}); re-synced to version {p.version} and submitted again")
        ev.load.remote(p.cum, p.version)
        p.ref = ev.evaluate.remote(*p.args, version=p.version)
        ev.load.remote(self.cum, self.version)  # back to the current version for what follows
