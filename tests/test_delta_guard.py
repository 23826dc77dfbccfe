"""The delta guard: a batch whose delta is NaN/Inf or explodes is rejected, every model copy and the
editor's state are left bit for bit as they were, the rejection is logged, and the run goes on."""

import math

import pytest
import torch

from lme_sim.runtime.delta_guard import delta_problem
from lme_sim.runtime.services import Edited, EditorService, Rejected
from lme_sim.runtime.shards import ModelShard
from lme_sim.scenario import EditorSpec
from lme_sim.storage.logger import read_only_query


def test_delta_problem_names_the_matrix_and_what_is_wrong():
    W = {"w": 10.0}
    assert delta_problem({"w": torch.ones(2, 2)}, W, max_delta_norm=1.0) is None  # norm 2 <= 1.0 * 10
    nan = torch.ones(2, 2)
    nan[0, 1] = float("nan")
    assert delta_problem({"w": nan}, W) == "w: 1 of 4 delta values are NaN/Inf"
    assert "NaN/Inf" in delta_problem({"w": torch.full((2, 2), float("inf"))}, W)
    big = delta_problem({"w": torch.full((2, 2), 1e30)}, W)  # finite, but its float32 norm would overflow
    assert (
        big.startswith("w: delta norm 2e+30 is 2e+29x the weight's norm 10")
        and "max_delta_norm = 1000" in big
    )
    assert "max_delta_norm = 0.1" in delta_problem({"w": torch.ones(2, 2)}, W, max_delta_norm=0.1)


def _everything(svc: EditorService) -> dict:
    """Every weight of every model copy the editor service holds, and its editor's state."""
    copies = {
        f"shard{i}.{k}": v.clone()
        for i, s in enumerate(svc.backbone.shards)
        for k, v in s.model.state_dict().items()
    }
    if svc.local is not None:
        copies.update({f"local.{k}": v.clone() for k, v in svc.local.model.state_dict().items()})
    state = svc.editor.state_dict()
    copies.update({f"state.{k}.{l}": t.clone() for k, d in state.items() for l, t in d.items()})
    return copies


def _assert_same(before: dict, after: dict):
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


def _poison_second_solve(editor, factor):
    """Scale the delta of the second edited layer: the first layer's (good) delta is already on its shard."""
    real, calls = editor.solve, []

    def solve(layer, K, R):
        calls.append(layer)
        out = real(layer, K, R)
        return out * factor if len(calls) == 2 else out

    editor.solve = solve


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_alphaedit_on_shards_rejected_batch_leaves_shards_and_state_unchanged(small_world, poison):
    shards = [ModelShard("world:small", range(0, 2)), ModelShard("world:small", range(2, 4))]
    svc = EditorService("world:small", shards, EditorSpec(method="alphaedit"))
    cases = small_world[2].edit_cases(20, seed=11)
    assert isinstance(
        svc.edit(cases[:10]), Edited
    )  # some history: non-zero editor state (AlphaEdit's key cache)
    before = _everything(svc)
    _poison_second_solve(svc.editor, float("nan") if poison == "nan" else 1e4)
    out = svc.edit(cases[10:])
    assert isinstance(out, Rejected) and out.reason.startswith("transformer.h.2.mlp.c_proj.weight: ")
    assert ("NaN/Inf" if poison == "nan" else "the weight's norm") in out.reason
    _assert_same(before, _everything(svc))
    del svc.editor.solve  # the editor is sound again: the same batch now goes through
    out = svc.edit(cases[10:])
    assert set(out.deltas) == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"}
    assert {"keys", "targets", "solve", "guard", "health"} <= set(out.timings)  # the runtime's phases too
    assert not torch.equal(
        before["shard1.transformer.h.2.mlp.c_proj.weight"],
        shards[1].model.state_dict()["transformer.h.2.mlp.c_proj.weight"],
    )


@pytest.mark.parametrize(
    "hparams, reason",
    [
        ({"lr": math.inf, "norm_constraint": math.inf}, "NaN/Inf"),
        ({"lr": 1e3, "norm_constraint": 1e3}, "the weight's norm"),
    ],
)
def test_ft_in_process_rejected_batch_leaves_replica_and_shards_unchanged(small_world, hparams, reason):
    """FT trains a local replica in place; the shards only follow accepted deltas."""
    shards = [ModelShard("world:small", range(0, 4))]
    svc = EditorService("world:small", shards, EditorSpec(method="ft"))
    cases = small_world[2].edit_cases(10, seed=12)
    before = _everything(svc)
    sound = svc.editor.hp.model_copy(update={"num_steps": 5})  # short: the test is about what is kept
    svc.editor.hp = sound.model_copy(update=hparams)  # a diverging configuration
    assert reason in svc.edit(cases).reason
    _assert_same(before, _everything(svc))
    svc.editor.hp = sound
    assert isinstance(svc.edit(cases), Edited)


def test_a_tight_limit_rejects_ordinary_deltas(small_world):
    svc = EditorService(
        "world:small",
        [ModelShard("world:small", range(0, 4))],
        EditorSpec(method="memit", max_delta_norm=1e-6),
    )
    before = _everything(svc)
    assert "max_delta_norm = 1e-06" in svc.edit(small_world[2].edit_cases(5, seed=13)).reason
    _assert_same(before, _everything(svc))


def test_run_logs_a_rejected_batch_and_goes_on(tmp_path, ray_session, monkeypatch):
    """On Ray: the second of three batches gets a NaN delta; it is logged, and neither the shards nor
    the evaluators see it (the evaluation after it scores the same model as the one before)."""
    from lme_sim.runtime import coordinator
    from lme_sim.scenario import load_scenario

    class PoisonSecondBatch(EditorService):  # defined here: Ray ships it to the editor actor by value
        def edit(self, cases):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches != 2:
                return super().edit(cases)
            real, calls = self.editor.solve, []

            def solve(layer, K, R):  # the second layer's delta becomes NaN
                calls.append(layer)
                return real(layer, K, R) * (float("nan") if len(calls) == 2 else 1.0)

            self.editor.solve = solve
            try:
                return super().edit(cases)
            finally:
                del self.editor.solve

    monkeypatch.setattr(coordinator, "EditorService", PoisonSecondBatch)
    db = tmp_path / "g.duckdb"
    path = tmp_path / "g.yaml"
    path.write_text(f"""
name: guarded
model: world:small
data: {{kind: world, n_edits: 30, seed: 8}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
""")
    coordinator.run_distributed(load_scenario(path), str(path))
    _, rejected = read_only_query(db, "select after_batch, n_edits, edit_ids, reason from rejected_batches")
    ((after, n, ids, reason),) = rejected
    assert (after, n, ids) == (0, 10, list(range(10, 20)))
    assert reason == "transformer.h.2.mlp.c_proj.weight: 65536 of 65536 delta values are NaN/Inf"
    _, edits = read_only_query(
        db, "select batch_id, min(edit_id), max(edit_id) from edits group by 1 order by 1"
    )
    assert edits == [(0, 0, 9), (1, 20, 29)]
    _, status = read_only_query(db, "select status from runs")
    assert status == [("finished",)]
    _, evals = read_only_query(
        db, "select eval_id, min(batch_id), max(batch_id) from probes group by 1 order by 1"
    )
    assert evals == [(1, 0, 0), (2, 0, 0), (3, 1, 1)]  # eval 2 came after the rejected batch
    _, metrics = read_only_query(db, "select eval_id, name, value from metrics order by 1, 2")
    by_eval = {k: [(n, v) for e, n, v in metrics if e == k] for k in (1, 2)}
    assert by_eval[1] == by_eval[2] and by_eval[1]  # the evaluator's replica did not move
    _, ws = read_only_query(db, "select max(frobenius), bool_and(isfinite(cum_delta_norm)) from weight_stats")
    assert math.isfinite(ws[0][0]) and ws[0][1]
