import torch

from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.targets import compute_targets
from lme_sim.scoring import score_targets


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
    from lme_sim.arch import layer_path
    from lme_sim.hooks import edit_output
    from lme_sim.tokens import subject_last_positions

    model, tok, world = small_world
    cases = world.edit_cases(8, seed=6)
    hp = load_hparams("alphaedit", "world:small")
    t = compute_targets(model, tok, cases, 2, ["{}"], hp)
    assert (t.delta.norm(dim=1) <= hp.clamp_norm_factor * t.h_init.norm(dim=1) + 1e-5).all()
    prompts = [c.prompt for c in cases]
    pos = subject_last_positions(tok, prompts, [c.subject for c in cases])
    for i, c in enumerate(cases):
        def put(h, i=i):
            h = h.clone()
            h[0, pos[i]] = t.z[i]
            return h

        with edit_output(model.get_submodule(layer_path(model, 2)), put):
            new = score_targets(model, tok, [c.prompt], [c.target_new]).mean_logprob
            old = score_targets(model, tok, [c.prompt], [c.target_true]).mean_logprob
        assert new > old, c
