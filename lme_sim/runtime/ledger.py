"""What a run writes down: where it is (:class:`RunState`), its checkpoints and its rows.

A checkpoint is the run's state plus the editor's state and the stream's position
(:class:`Checkpoint`), written atomically before the rows of its batch are committed; a run's
folder keeps the ones a resume may need (:class:`Checkpoints`): the newest whose evaluations have
all landed, and every newer one. The rows of a batch are built here from the
batch's events and the editor's :class:`~.services.Edited` (one record per row,
:mod:`lme_sim.storage.records`); the logger adds the ``run_id``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..storage.records import BatchRecord, EditRecord, RejectedBatchRecord, WeightStatRecord, row, rows
from ..stream import Event
from .services import Edited, version_after


@dataclass
class RunState:
    """Where a run is: its last committed batch (``batch_id``, the run's one counter; -1: none yet),
    its last evaluation, the accumulated deltas of the model after that batch and the edits in force
    (in the order they were written)."""

    batch_id: int = -1
    eval_id: int = 0
    cum: dict[str, torch.Tensor] = field(default_factory=dict)
    committed: list[int] = field(default_factory=list)

    def commit(self, batch: list[Event], deltas: dict[str, torch.Tensor]) -> None:
        """``batch`` is in force: the next batch id, its deltas added to the accumulated
        ones (a new dict: the evaluators' pool keeps the one of the version before)."""
        self.batch_id += 1
        self.cum = {
            **self.cum,
            **{n: self.cum[n] + d if n in self.cum else d.clone() for n, d in deltas.items()},
        }
        self.committed += [e.edit_id for e in batch]

    @property
    def version(self) -> int:
        """The model version the evaluators follow: the batches in force (:func:`.services.version_after`)."""
        return version_after(self.batch_id)


@dataclass
class Checkpoint:
    """What a resume starts from: the run's state, the editor's state and the stream's position."""

    state: RunState
    editor: dict
    stream: dict

    def save(self, path: Path) -> None:
        """Write it to ``path`` atomically (a file next to it, then renamed)."""
        st, tmp = self.state, path.with_suffix(".tmp")
        torch.save(
            {
                "deltas": st.cum,
                "editor": self.editor,
                "stream": self.stream,
                "committed": st.committed,
                "batch_id": st.batch_id,
                "eval_id": st.eval_id,
            },
            tmp,
        )
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        saved = torch.load(path, weights_only=False)  # an older one's "version" is batch_id + 1: unread
        state = RunState(
            batch_id=saved["batch_id"],
            eval_id=saved["eval_id"],
            cum=saved["deltas"],
            committed=saved["committed"],
        )
        return cls(state, editor=saved["editor"], stream=saved["stream"])


def complete(eval_id: int, landed: set[int]) -> bool:
    """Whether every evaluation submitted before a checkpoint (ids 1..``eval_id``) has landed: a resume
    from it loses none (the evaluations after it are redone)."""
    return all(i in landed for i in range(1, eval_id + 1))


class Checkpoints:
    """A run's checkpoint folder, ``batch-<batch_id>.pt``. Evaluations run behind the editor (up to
    ``eval.max_pending``), so the newest checkpoint can be ahead of evaluations still in flight; a
    resume from it would lose them. The folder keeps the newest checkpoint whose evaluations have all
    landed (:func:`complete`), where a resume starts, and every newer one."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.kept: list[tuple[int, Path]] = []  # (the checkpoint's eval_id, its file), oldest first

    def write(self, ckpt: Checkpoint) -> str:
        """Save ``ckpt``; its path (for the batch's row)."""
        path = self.folder / f"batch-{ckpt.state.batch_id:06d}.pt"
        ckpt.save(path)
        self.kept.append((ckpt.state.eval_id, path))
        return str(path)

    def prune(self, landed: set[int]) -> None:
        """Delete the checkpoints older than the newest one whose evaluations have all landed."""
        done = [i for i, (eval_id, _) in enumerate(self.kept) if complete(eval_id, landed)]
        if done:
            for _, path in self.kept[: done[-1]]:
                path.unlink(missing_ok=True)
            self.kept = self.kept[done[-1] :]

    def resume_from(self, found: list[tuple[int, str]], landed: set[int]) -> Checkpoint | None:
        """Where a resume starts, of the run's checkpointed batches ``found`` ((batch_id, file), newest
        first) and its evaluations that ``landed``: the newest checkpoint whose evaluations have all
        landed; None (the run's start) where none has, e.g. a run stopped before its first
        checkpoint's evaluations landed, or one of an lme-sim that kept its last two checkpoints only.
        The folder then keeps that one only (the newer ones were of batches the resume replays)."""
        chosen = None
        for _, file in found:
            if Path(file).exists() and complete((ckpt := Checkpoint.load(file)).state.eval_id, landed):
                chosen = (ckpt, Path(file))
                break
        for other in self.folder.glob("batch-*.pt"):
            if chosen is None or other.resolve() != chosen[1].resolve():
                other.unlink()
        self.kept = [(chosen[0].state.eval_id, chosen[1])] if chosen else []
        return chosen[0] if chosen else None


def rejected_row(batch: list[Event], reason: str, state: RunState) -> dict:
    """The ``rejected_batches`` row of a batch the delta guard refused (after ``state.batch_id``)."""
    return row(
        RejectedBatchRecord(
            after_batch=state.batch_id,
            sim_time=batch[-1].time,
            n_edits=len(batch),
            edit_ids=[e.edit_id for e in batch],
            reason=reason,
            rejected_at=dt.datetime.now(dt.timezone.utc),
        )
    )


def batch_row(
    batch: list[Event], state: RunState, seconds: float, timings: dict, checkpoint: str | None
) -> dict:
    """The ``batches`` row of the batch ``state`` has just committed."""
    return row(
        BatchRecord(
            batch_id=state.batch_id,
            sim_time=batch[-1].time,
            n_edits=len(batch),
            seconds=seconds,
            timings=timings,
            checkpoint=checkpoint,
        )
    )


def batch_rows(batch: list[Event], result: Edited, state: RunState) -> dict[str, list[dict]]:
    """The rows that go with a committed batch's row: its ``edits`` (the modules each touched and
    their delta norms) and the ``weight_stats`` of every matrix it edited."""
    modules = sorted(result.deltas)
    norm = {m: float(d.norm()) for m, d in result.deltas.items()}
    touched = result.touched or [modules] * len(batch)
    edits = [
        EditRecord(
            edit_id=e.edit_id,
            batch_id=state.batch_id,
            sim_time=e.time,
            kind=e.kind,
            case_id=e.case.case_id,
            fact_key=e.fact_key,
            subject=e.case.subject,
            relation=e.case.relation,
            prompt=e.case.prompt,
            target_new=e.case.target_new,
            target_old=e.case.target_true,
            supersedes=e.supersedes,
            modules=sorted(mods),
            delta_norms=[norm.get(m, 0.0) for m in sorted(mods)],
        )
        for e, mods in zip(batch, touched)
    ]
    stats = [
        WeightStatRecord(
            batch_id=state.batch_id,
            module=w["module"],
            frobenius=w["frobenius"],
            spectral=w["spectral"],
            condition=w["condition"],
            delta_norm=norm.get(w["module"], 0.0),
            cum_delta_norm=w["cum_delta_norm"],
        )
        for w in result.weight_stats
    ]
    return rows(edits + stats)
