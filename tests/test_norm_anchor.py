"""Norm-Anchor Scaling (NAS, arXiv 2602.02543) as a plug-in for MEMIT and AlphaEdit."""

import pytest
import torch

from lme_sim.editors import make_editor
from lme_sim.editors.norm_anchor import anchor_deltas, mlp_values, upper_trimmed_mean
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel


def test_anchored_values_have_the_reference_norm_or_are_not_written():
    torch.manual_seed(0)
    v0, delta = torch.randn(6, 16), torch.randn(6, 16)
    delta[5] *= 100  # far above twice the reference: skipped
    shift = anchor_deltas(delta, v0, ref=4.0, skip_factor=2.0)
    norms = (v0 + shift).norm(dim=1)
    assert torch.allclose(norms[:5], torch.full((5,), 4.0), rtol=1e-5)
    assert torch.equal(shift[5], torch.zeros(16))  # v* = v0: the request writes nothing
    cos = torch.nn.functional.cosine_similarity(v0 + shift, v0 + delta)[:5]
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)  # only the norm changes


def test_upper_trimmed_mean_drops_the_top_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    assert upper_trimmed_mean(x, 0.8) == pytest.approx(2.5)
    assert upper_trimmed_mean(x, 1.0) == pytest.approx(22.0)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_the_solved_values_norms_equal_the_reference(method, fresh_small_world, tmp_path, monkeypatch):
    """With ``norm_anchor`` the values v* = v0 + (z - h) of the batch's targets have the reference norm
    (taken once on the unedited model, then read from the cache), and the edits still take."""
    monkeypatch.setenv("LME_SIM_CACHE", str(tmp_path))
    model, tok, world = fresh_small_world
    cases = world.edit_cases(10, seed=3)
    hp = {"norm_anchor": {"n_samples": 24}}
    editor = make_editor(method, LoadedModel("world:small", model, tok, world), overrides=hp, progress=False)
    ref = editor.anchor_norm
    assert ref > 0 and len(list((tmp_path / "norm_anchor").glob("*.json"))) == 1
    layer = editor.hp.layers[-1]
    t = editor.targets(cases)
    v0 = mlp_values(editor.model, tok, cases, layer, 64)
    norms = (v0 + t.delta).norm(dim=1)
    written = t.delta.norm(dim=1) > 0
    print(f"{method}: reference {ref:.3f}; anchored norms {norms.tolist()}")
    assert written.sum() >= 8
    assert torch.allclose(norms[written], torch.full((int(written.sum()),), ref), rtol=1e-4)
    plain = make_editor(method, LoadedModel("world:small", model, tok, world), progress=False).targets(cases)
    assert not torch.allclose((v0 + plain.delta).norm(dim=1), torch.full((10,), ref), rtol=1e-2)
    editor.edit(cases)
    assert summarize(case_metrics(model, tok, cases))["efficacy"] >= 0.8
    again = make_editor(
        method, LoadedModel("world:small", model, tok, world), overrides=hp, progress=False
    )  # edited model
    assert again.anchor_norm == ref  # the cached reference of the unedited model
