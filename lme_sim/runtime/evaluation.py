"""Evaluations on evaluator actors, kept exact when an evaluator dies and Ray restarts it.

Evaluator actors are restartable: Ray re-runs the constructor (a fresh replica at version 0) and
sends the calls that were in flight again. A replica only applies a delta on top of the version
before it, and every evaluation names the version it is for, so a restarted replica answers
:class:`~.services.Behind` instead of scoring the wrong model. :class:`EvalPool` then loads into it
the model state that evaluation was for, submits it again under the same eval id, and brings the
replica to the current version: every eval id is scored exactly once, on its own version. An
evaluator that dies more often than ``EVALUATOR_RESTARTS`` times fails the run.

The pool keeps the accumulated deltas of the current version only, plus the batch deltas since the
oldest pending evaluation (``cum`` of an older version is the current one minus those): a pending
evaluation pins no copy of the model state of its own, and at most ``max_pending`` are pending.

What an evaluation scores is :func:`eval_request`'s policy: a uniform sample of the edits so far
and of the facts they edited (every one of them at the end of the run).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .services import Behind, EvalRequest, Evaluation, RetentionItem

if TYPE_CHECKING:
    from ..scenario import EvalSpec
    from ..stream import Event
    from .ledger import RunState

EVALUATOR_RESTARTS = 3  # per evaluator and run
# what the evaluator actors are created with: restart them, and retry calls that were in flight
RESTARTABLE = {"max_restarts": EVALUATOR_RESTARTS, "max_task_retries": -1}


@dataclass
class _Pending:
    ref: object
    evaluator: int
    request: EvalRequest
    version: int
    resyncs: int = 0


class EvalPool:
    """Submits evaluations round-robin, forwards deltas, and collects results in any order."""

    def __init__(self, ray, evaluators: list, console=None, max_pending: int = 4):
        self.ray, self.evaluators, self.console = ray, evaluators, console
        self.max_pending = max_pending
        self.pending: list[_Pending] = []
        self.version, self.cum = 0, {}
        self._log: dict[int, dict[str, torch.Tensor]] = {}  # version -> its batch's deltas, while needed

    def submit(self, req: EvalRequest) -> None:
        """Score the current version (the one of the last :meth:`follow` or :meth:`load`)."""
        i = req.eval_id % len(self.evaluators)
        ref = self.evaluators[i].evaluate.remote(req, version=self.version)
        self.pending.append(_Pending(ref, i, req, self.version))

    def full(self) -> bool:
        return len(self.pending) >= self.max_pending

    def follow(self, deltas: dict[str, torch.Tensor], version: int, cum: dict[str, torch.Tensor]) -> None:
        """Send a batch's deltas to every evaluator (queued behind any evaluation in flight, so
        versions stay ordered); ``cum``: the accumulated deltas of ``version``."""
        for ev in self.evaluators:
            ev.follow.remote(deltas, version)
        if self.pending:
            self._log[version] = deltas
        self.version, self.cum = version, cum

    def load(self, cum: dict[str, torch.Tensor], version: int) -> None:
        """Put every evaluator at an absolute state (resuming a run) and wait for it."""
        self.ray.get([ev.load.remote(cum, version) for ev in self.evaluators])
        self.version, self.cum, self._log = version, cum, {}

    def collect(self, wait: bool) -> list[Evaluation]:
        """Results of the finished evaluations (all of them with ``wait``); an evaluator found
        behind is re-synced and its evaluation submitted again."""
        results = []
        while self.pending:
            refs = [p.ref for p in self.pending]
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
            done = set(done)
            for p in [p for p in self.pending if p.ref in done]:
                out = self.ray.get(p.ref)  # an evaluator dead for good raises here: the run fails
                if isinstance(out, Behind):
                    self._resync(p, out.version)
                else:
                    self.pending.remove(p)
                    results.append(out)
            if not wait:
                break
        oldest = min((p.version for p in self.pending), default=self.version)
        self._log = {v: d for v, d in self._log.items() if v > oldest}
        return results

    def wait_for_room(self) -> list[Evaluation]:
        """Block while ``max_pending`` evaluations are in flight; returns those that finished."""
        results = self.collect(wait=False)
        while self.full():
            self.ray.wait([p.ref for p in self.pending], num_returns=1)
            results += self.collect(wait=False)
        return results

    def cum_at(self, version: int) -> dict[str, torch.Tensor]:
        """The accumulated deltas of an earlier ``version``: the current ones minus the batches since."""
        cum = dict(self.cum)
        for v, deltas in self._log.items():
            if v > version:
                for name, d in deltas.items():
                    cum[name] = cum[name] - d
        return cum

    def _resync(self, p: _Pending, at: int) -> None:
        p.resyncs += 1
        if p.resyncs > EVALUATOR_RESTARTS + 1:
            raise RuntimeError(
                f"evaluator {p.evaluator} keeps losing its replica (evaluation {p.request.eval_id})"
            )
        ev = self.evaluators[p.evaluator]
        if self.console is not None:
            self.console.print(
                f"evaluation {p.request.eval_id}: evaluator {p.evaluator} was restarted (its replica "
                f"was at version {at}); re-synced to version {p.version} and submitted again"
            )
        ev.load.remote(self.cum_at(p.version), p.version)
        p.ref = ev.evaluate.remote(p.request, version=p.version)
        ev.load.remote(self.cum, self.version)  # back to the current version for what follows


def eval_request(state: RunState, by_edit: dict[int, Event], spec: EvalSpec, final: bool) -> EvalRequest:
    """The evaluation ``state.eval_id`` of the run's current version: a uniform sample of
    ``spec.retention_sample`` of the edits in force and of the facts they edited (``final``: all of
    them), and the prompts of the last ``spec.fluency_prompts`` edits for fluency."""
    committed, n = state.committed, spec.retention_sample
    ids = committed
    if not final and len(ids) > n:
        ids = sorted(random.Random(state.eval_id).sample(ids, n))
    latest = retention_items(committed, by_edit)
    facts = list(latest.values())
    if not final and len(facts) > n:
        if len(facts) == len(committed):  # one edit per fact: the sampled edits' facts, which
            # share their prompts with the edits' probes (one pass for both, scoring.score_by_prompt)
            keys = {by_edit[i].fact_key for i in ids}
            facts = [r for k, r in latest.items() if k in keys]
        else:
            facts = random.Random(-state.eval_id).sample(facts, n)
    recent = (
        [by_edit[i].case.prompt for i in committed[-spec.fluency_prompts :]] if spec.fluency_prompts else []
    )
    return EvalRequest(
        eval_id=state.eval_id,
        retention=facts,
        cases=[by_edit[i].case for i in ids],
        n_edits=len(committed),
        fluency_prompts=recent,
        generative=spec.generative,
    )


def retention_items(committed: list[int], by_edit: dict[int, Event]) -> dict[str, RetentionItem]:
    """Each edited fact's latest value and the values it had before (from the edits in force, in
    the order they were written)."""
    latest: dict[str, RetentionItem] = {}
    for i in committed:
        e = by_edit[i]
        prev = latest.get(e.fact_key)
        earlier = (
            prev.earlier + [prev.value] if prev else ([e.case.target_true] if e.case.target_true else [])
        )
        latest[e.fact_key] = RetentionItem(i, e.case.prompt, e.case.target_new, earlier)
    return latest
