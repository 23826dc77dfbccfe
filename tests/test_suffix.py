"""Suffix passes (lme_sim.suffix) against the full passes they replace: same logits, gradients,
targets (to 1e-4 relative, identical step counts), keys and edits, in process and on shards."""

import copy
import dataclasses

import pytest
import torch

from lme_sim.backbone import Inject, LocalBackbone, Positions
from lme_sim.editors import make_editor
from lme_sim.editors.activations import compute_keys
from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.targets import _RowBatch, compute_targets
from lme_sim.models import LoadedModel
from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers
from lme_sim.scoring import logits_at
from lme_sim.suffix import length_groups

CONTEXTS = ["{}", "The job of . {}"]


def _sharded(model, n):
    return ShardedBackbone([ModelShard(copy.deepcopy(model), r) for r in split_layers(4, n)])


def _ragged(cases):
    """The world's prompts end at the subject and its objects are one token: give the rows words
    after the subject and two-token targets, so that suffixes differ in length."""
    extra = ["", " is the job of", " and"]
    return [
        dataclasses.replace(
            c,
            prompt=c.prompt + extra[i % 3],
            target_new=f"{c.target_new} {c.target_true}" if i % 2 else c.target_new,
        )
        for i, c in enumerate(cases)
    ]


def _rel(a, b):
    """Largest relative difference of target deltas, per request."""
    return ((a.z - b.z).norm(dim=1) / b.delta.norm(dim=1).clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("n_shards", [0, 1, 3])  # 0: the in-process backbone
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_suffix_logits_and_gradients_equal_full_pass(small_world, n_shards, layer):
    model, tok, world = small_world
    cases = _ragged(world.edit_cases(6, seed=2))
    rw = _RowBatch.build(tok, cases, CONTEXTS, "{} is a")
    bb = LocalBackbone(model) if n_shards == 0 else _sharded(model, n_shards)
    assert bb.supports_suffix()
    handle, kl_logits = rw.prefix(bb, layer)
    if n_shards == 0:
        assert len(length_groups(handle.length)) > 1  # padded batches of different widths
    kl_rows = rw.is_kl.nonzero()[:, 0]
    full_kl = logits_at(model, rw.ids, rw.mask, Positions(kl_rows, rw.subj_pos[kl_rows]))
    assert torch.allclose(kl_logits, full_kl, atol=1e-5)
    sel = torch.tensor([0, 3, 4, 5, 8, 9, 11, 12, 16])  # a subset of rows, as after requests converged
    ids, mask, subj = rw.ids[sel], rw.mask[sel], rw.subj_pos[sel]
    local = torch.full((len(rw.owner),), -1).index_put_((sel,), torch.arange(len(sel)))
    t = local[rw.tgt_row] >= 0  # read where the loss reads: the subject's last token and the target tokens
    rows = torch.cat([torch.arange(len(sel)), local[rw.tgt_row[t]]])
    pos = torch.cat([subj, rw.tgt_pos[t]])
    got = {}
    for name in ("full", "suffix"):
        values = torch.randn(len(sel), model.config.n_embd, generator=torch.Generator().manual_seed(0))
        values.requires_grad_(True)
        if name == "full":
            inject = Inject(layer, Positions(torch.arange(len(sel)), subj), values)
            logits = logits_at(model, ids, mask, Positions(rows, pos), inject=inject)
        else:
            logits = bb.suffix_logits(handle, sel, values, Positions(rows, pos - subj[rows]))
        logits.logsumexp(-1).sum().backward()
        got[name] = (logits.detach(), values.grad)
    bb.drop_prefix(handle)
    (a, ga), (b, gb) = got.values()
    assert torch.allclose(a, b, atol=1e-4)
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("stop", [0.05, 0.5, 1.0])  # 0.5, 1.0: requests converge after different steps
@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("ragged", [False, True])
def test_suffix_targets_equal_full_passes(small_world, layer, stop, ragged):
    model, tok, world = small_world
    cases = world.edit_cases(10, seed=5)
    cases = _ragged(cases) if ragged else cases
    # the ragged rows are off the world's distribution (unknown words, losses 3-7 that never reach the
    # stop): over 25 steps of lr 0.5 float32 rounding differences grow from 1e-6 (12 steps) to 3e-4
    # (in float64 the two paths agree exactly), so they run 12 steps
    steps = 12 if ragged else 25
    hp = load_hparams("alphaedit", "world:small", {"v_loss_stop": stop, "v_num_grad_steps": steps})
    new = compute_targets(model, tok, cases, layer=layer, contexts=CONTEXTS, hp=hp)
    ref = compute_targets(model, tok, cases, layer=layer, contexts=CONTEXTS, hp=hp, reuse=False)
    assert torch.equal(new.steps, ref.steps)
    assert _rel(new, ref) < 1e-4
    assert torch.allclose(new.loss, ref.loss, rtol=1e-4, atol=1e-6)
    if stop == 0.5 and not ragged:
        assert len(set(ref.steps.tolist())) > 2  # the batch shrinks along the way


def test_suffix_targets_on_shards_equal_reference(small_world):
    model, tok, world = small_world
    cases = _ragged(world.edit_cases(8, seed=3))
    # ragged rows: 12 steps (see test_suffix_targets_equal_full_passes)
    hp = load_hparams("memit", "world:small", {"v_loss_stop": 0.5, "v_num_grad_steps": 12})
    ref = compute_targets(model, tok, cases, layer=2, contexts=CONTEXTS, hp=hp, reuse=False)
    for n in (2, 3):  # block 2's owner holds block 3 too, or not
        new = compute_targets(_sharded(model, n), tok, cases, layer=2, contexts=CONTEXTS, hp=hp)
        assert torch.equal(new.steps, ref.steps)
        assert _rel(new, ref) < 1e-4


def test_keys_passes_that_stop_early_equal_full_passes(small_world):
    model, tok, world = small_world
    cases = world.edit_cases(6, seed=4)
    for bb in (LocalBackbone(model), _sharded(model, 3)):
        early = compute_keys(bb, tok, cases, [1, 2], CONTEXTS)
        full = compute_keys(bb, tok, cases, [1, 2], CONTEXTS, early_stop=False)
        for l in (1, 2):
            assert torch.equal(early[l], full[l])


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_editor_reuse_equals_reference_path(small_world, method):
    """Deltas, metrics and AlphaEdit's key covariance (K_p from the loop's keys) as on the full passes."""
    from lme_sim.metrics import case_metrics, summarize

    model, tok, world = small_world
    cases = world.edit_cases(20, seed=0)
    runs = {}
    for reuse in (True, False):
        m = copy.deepcopy(model)
        editor = make_editor(
            method, LoadedModel("world:small", m, tok, world), overrides={"v_loss_stop": 0.5}, progress=False
        )
        editor.reuse = reuse
        deltas = [editor.edit(cases[i : i + 10]).deltas for i in (0, 10)]
        runs[reuse] = (deltas, summarize(case_metrics(m, tok, cases)), editor.state_dict())
    (d1, m1, s1), (d0, m0, s0) = runs[True], runs[False]
    for b1, b0 in zip(d1, d0):
        for k in b0:
            assert (b1[k] - b0[k]).norm() <= 1e-4 * b0[k].norm(), k
    assert m1 == pytest.approx(m0, abs=1e-6)
    for l, c in s0.get("cache_c", {}).items():
        assert torch.allclose(s1["cache_c"][l], c, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_suffix_targets_equal_full_passes_on_smollm2():
    """SmolLM2-135M (Llama: RoPE, grouped-query attention), the AlphaEdit paper's settings at layer 8:
    deltas to 1e-3 (relative), the same step counts except where a loss lies within 1e-3 of the stop."""
    from lme_sim.data import load_counterfact
    from lme_sim.editors.activations import context_templates
    from lme_sim.models import load_model

    from .conftest import shared_file

    lm = load_model("smollm2-135m", progress=False)
    cases = load_counterfact(shared_file("counterfact-edit.json"), limit=6)
    hp = load_hparams("alphaedit", "smollm2-135m", {"layers": [4, 5, 6, 7, 8], "v_lr": 0.1})
    contexts = context_templates(lm.model, lm.tok, hp.context_templates)
    new = compute_targets(lm.model, lm.tok, cases, layer=8, contexts=contexts, hp=hp)
    ref = compute_targets(lm.model, lm.tok, cases, layer=8, contexts=contexts, hp=hp, reuse=False)
    # step counts may differ only where the run that stopped first was within 1e-3 of the stop
    differ = new.steps != ref.steps
    first = torch.where(new.steps < ref.steps, new.loss, ref.loss)
    assert ((first[differ] - hp.v_loss_stop).abs() < 1e-3).all()
    same = ~differ
    rel = ((new.z - ref.z)[same].norm(dim=1) / ref.delta[same].norm(dim=1)).max().item()
    assert same.sum() >= len(cases) - 1 and rel < 1e-3
