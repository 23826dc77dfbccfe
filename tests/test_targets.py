import torch

from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.targets import compute_targets


def test_batched_targets_equal_one_at_a_time(small_world):
    """All requests at once, in chunks that fit ``batch_size`` rows (3 rows each: 2 contexts + KL;
    7 rows: 2 requests at a time, the last alone) and one at a time give the same targets."""
    model, tok, world = small_world
    cases = world.edit_cases(5, seed=5)
    contexts = ["{}", "The job of . {}"]
    single = compute_targets(model, tok, cases, layer=2, contexts=contexts, hp=_hp(64), batched=False)
    for rows in (64, 7):
        batched = compute_targets(model, tok, cases, layer=2, contexts=contexts, hp=_hp(rows), batched=True)
        assert torch.equal(batched.steps, single.steps)
        assert torch.allclose(batched.z, single.z, atol=1e-4)
        assert torch.allclose(batched.loss, single.loss, atol=1e-4)
    assert not torch.equal(single.steps, torch.zeros_like(single.steps))  # the targets really moved


def test_target_optimization_runs_at_most_batch_size_rows_per_pass(small_world, monkeypatch):
    """Memory: the rows of one optimization (requests x (contexts + KL)) never exceed ``batch_size``."""
    from lme_sim.editors import targets

    model, tok, world = small_world
    seen = []
    build = targets._RowBatch.build
    monkeypatch.setattr(targets._RowBatch, "build", lambda *a: seen.append(len((rb := build(*a)).ids)) or rb)
    compute_targets(model, tok, world.edit_cases(10, seed=2), layer=2, contexts=["{}", "A . {}"], hp=_hp(9))
    assert seen == [9, 9, 9, 3]  # 3 requests of 3 rows at a time, then the tenth


def _hp(rows: int):
    return load_hparams("alphaedit", "world:small", {"v_num_grad_steps": 12, "rows_per_pass": rows})


def test_targets_make_the_model_predict_the_new_object(small_world):
    """Injecting z at layer L (last subject token) makes the new object more likely than the old."""
    from lme_sim.backbone import Inject, Positions
    from lme_sim.scoring import logits_at
    from lme_sim.tokens import encode_pairs, subject_last_positions

    model, tok, world = small_world
    cases = world.edit_cases(8, seed=6)
    hp = load_hparams("alphaedit", "world:small")
    t = compute_targets(model, tok, cases, layer=2, contexts=["{}"], hp=hp)
    assert (t.delta.norm(dim=1) <= hp.clamp_norm_factor * t.h_init.norm(dim=1) + 1e-5).all()
    prompts = [c.prompt for c in cases]
    pos = subject_last_positions(tok, prompts, [c.subject for c in cases])
    for i, c in enumerate(cases):
        at = Positions(torch.tensor([0]), pos[i : i + 1])
        lp = {}
        for which in ("target_new", "target_true"):
            batch = encode_pairs(tok, [c.prompt], [getattr(c, which)])
            # h_L at the subject becomes z: add z - h_init there
            rows, p, labels = batch.target_positions()
            logits = logits_at(
                model,
                batch.input_ids,
                batch.attention_mask,
                Positions(rows, p),
                inject=Inject(2, at, t.delta[i : i + 1]),
            )
            lp[which] = torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean()
        assert lp["target_new"] > lp["target_true"], c
