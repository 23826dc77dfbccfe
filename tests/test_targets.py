import torch

from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.targets import compute_targets


def test_batched_targets_equal_one_at_a_time(small_world):
    model, tok, world = small_world
    cases = world.edit_cases(6, seed=5)
    hp = load_hparams("alphaedit", "world:small", {"v_num_grad_steps": 12})
    contexts = ["{}", "The job of . {}"]
    batched = compute_targets(model, tok, cases, 2, contexts, hp, batched=True)
    single = compute_targets(model, tok, cases, 2, contexts, hp, batched=False)
    assert torch.equal(batched.steps, single.steps)
    assert torch.allclose(batched.z, single.z, atol=1e-4)
    assert torch.allclose(batched.loss, single.loss, atol=1e-4)


def test_targets_make_the_model_predict_the_new_object(small_world):
    """Injecting z at layer L (last subject token) makes the new object more likely than the old."""
    from lme_sim.backbone import Inject, Positions
    from lme_sim.scoring import logits_at
    from lme_sim.tokens import encode_pairs, subject_last_positions

    model, tok, world = small_world
    cases = world.edit_cases(8, seed=6)
    hp = load_hparams("alphaedit", "world:small")
    t = compute_targets(model, tok, cases, 2, ["{}"], hp)
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
                model, batch.input_ids, batch.attention_mask, rows, p, Inject(2, at, t.delta[i : i + 1])
            )
            lp[which] = torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean()
        assert lp["target_new"] > lp["target_true"], c
