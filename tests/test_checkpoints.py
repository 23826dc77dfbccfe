"""Which checkpoints a run keeps and where a resume starts (runtime/ledger.py), without Ray: evaluations
run behind the editor, so a resume starts from the newest checkpoint whose evaluations have all landed,
and loses none of them."""

import torch

from lme_sim.runtime.ledger import Checkpoint, Checkpoints, RunState, complete


def _ckpt(batch_id: int, eval_id: int) -> Checkpoint:
    state = RunState(batch_id=batch_id, eval_id=eval_id, cum={"w": torch.full((2,), float(batch_id))})
    return Checkpoint(state, editor={"batch": batch_id}, stream={"position": batch_id})


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("batch-*.pt"))


def test_a_checkpoint_is_complete_when_every_evaluation_before_it_landed():
    assert complete(0, set()) and complete(2, {1, 2}) and complete(2, {1, 2, 3})
    assert not complete(3, {1, 2}) and not complete(3, {1, 3})


def test_the_folder_keeps_the_newest_complete_checkpoint_and_every_newer_one(tmp_path):
    cps = Checkpoints(tmp_path / "run")
    cps.write(_ckpt(1, 1))  # evaluations 1 (before batch 1's checkpoint) ...
    cps.write(_ckpt(3, 2))
    cps.write(_ckpt(5, 3))
    cps.prune({1})  # evaluations 2 and 3 in flight: batch 1's is where a resume would start
    assert _files(cps.folder) == ["batch-000001.pt", "batch-000003.pt", "batch-000005.pt"]
    cps.prune({1, 2})
    assert _files(cps.folder) == ["batch-000003.pt", "batch-000005.pt"]
    cps.write(_ckpt(7, 4))
    cps.prune({1, 2, 3, 4})  # all landed: the newest alone
    assert _files(cps.folder) == ["batch-000007.pt"]


def test_a_resume_starts_from_the_newest_checkpoint_whose_evaluations_landed(tmp_path):
    cps = Checkpoints(tmp_path / "run")
    found = [(b, cps.write(_ckpt(b, e))) for b, e in [(1, 1), (3, 2), (5, 3)]][::-1]  # newest first
    again = Checkpoints(tmp_path / "run")  # the resumed run's
    ckpt = again.resume_from(found, landed={1, 2})
    assert ckpt.state.batch_id == 3 and torch.equal(ckpt.state.cum["w"], torch.full((2,), 3.0))
    assert ckpt.editor == {"batch": 3} and ckpt.stream == {"position": 3}
    assert _files(again.folder) == ["batch-000003.pt"]  # batch 5 is replayed, batch 1 not needed


def test_without_a_complete_checkpoint_the_resume_starts_from_the_beginning(tmp_path):
    """No checkpoint whose evaluations all landed (a run stopped early, or one of an lme-sim that kept
    its last two checkpoints only): the run's start is the one place that loses none."""
    cps = Checkpoints(tmp_path / "run")
    found = [(b, cps.write(_ckpt(b, e))) for b, e in [(5, 3), (7, 4)]][::-1]
    assert Checkpoints(tmp_path / "run").resume_from(found, landed={1, 2}) is None
    assert _files(cps.folder) == []
    path = cps.write(_ckpt(1, 1))
    (tmp_path / "run" / "batch-000001.pt").unlink()  # a file gone
    assert Checkpoints(tmp_path / "run").resume_from([(1, path)], landed={1}) is None
    assert Checkpoints(tmp_path / "run").resume_from([], landed=set()) is None
