"""Editing on the small world: the acceptance properties of MEMIT, AlphaEdit and FT."""

import pytest
import torch

from lme_sim.arch import edit_module_path, weight_view
from lme_sim.backbone import LocalBackbone, Plan, Positions, as_backbone
from lme_sim.editors import make_editor
from lme_sim.editors.covariance import cached_second_moment
from lme_sim.editors.hparams import HParamsError, load_hparams
from lme_sim.linalg import nullspace_projector
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel

MODEL = "world:small"


def sequential(method, model, tok, world, cases, batch=10, **overrides):
    editor = make_editor(method, LoadedModel(MODEL, model, tok, world), overrides=overrides, progress=False)
    results = [editor.edit(cases[i : i + batch]) for i in range(0, len(cases), batch)]
    return editor, results, summarize(case_metrics(model, tok, cases))


@pytest.fixture(scope="module")
def stream(small_world):
    return small_world[2].edit_cases(100, seed=0)


@pytest.fixture(scope="module")
def memit_run(small_world, stream):
    import copy

    model, tok, world = small_world
    model = copy.deepcopy(model)
    return sequential("memit", model, tok, world, stream)


@pytest.fixture(scope="module")
def alphaedit_run(small_world, stream):
    import copy

    model, tok, world = small_world
    model = copy.deepcopy(model)
    return (model,) + sequential("alphaedit", model, tok, world, stream)


def test_alphaedit_sequential_10x10_efficacy(alphaedit_run, small_world, stream):
    _, _, _, after = alphaedit_run
    before = summarize(case_metrics(small_world[0], small_world[1], stream))
    print("AlphaEdit 10x10 before", before, "after", after)
    assert before["efficacy"] == 0.0
    assert after["efficacy"] >= 0.95
    assert after["generalization"] >= 0.85


def test_alphaedit_specificity_above_memit(alphaedit_run, memit_run):
    alpha, memit = alphaedit_run[3], memit_run[2]
    print("specificity AlphaEdit", alpha["specificity"], "MEMIT", memit["specificity"])
    assert memit["efficacy"] >= 0.9  # MEMIT really edits: its lower specificity is damage, not idleness
    assert alpha["specificity"] > memit["specificity"]


@torch.no_grad()
def _corpus_keys(model, tok, world, layer, n=300):
    """W's input at every real token of the world's text: (d_ff, tokens)."""
    enc = tok(world.corpus()[:n], return_tensors="pt", padding=True)
    rows, pos = enc["attention_mask"].nonzero(as_tuple=True)
    plan = Plan(keys={layer: Positions(rows, pos)})
    return LocalBackbone(model).run(enc["input_ids"], enc["attention_mask"], plan).keys[layer].T


def test_alphaedit_delta_leaves_preserved_keys_alone(fresh_small_world, stream):
    """Delta K0 ~ 0 for preserved keys (AlphaEdit eq. 15), where MEMIT's delta does move them.

    K0 are (a) the principal directions of C0 (eigenvalue >= threshold, scaled by sqrt of the
    eigenvalue: the keys AlphaEdit promises to preserve), and (b) the keys of every token of the
    world's own text. For (b) the bound is the share of K0 outside the preserved span, ||P K0||/||K0||.
    """
    model, tok, world = fresh_small_world
    layer = 2
    corpus = _corpus_keys(model, tok, world, layer)
    ratios = {}
    for method in ("alphaedit", "memit"):
        editor = make_editor(method, LoadedModel(MODEL, model, tok, world), progress=False)
        if method == "alphaedit":
            C0 = cached_second_moment(
                LoadedModel(MODEL, model, tok, world), editor.hp.layers, editor.hp.stats, progress=False
            )[layer]
            eigvals, eigvecs = torch.linalg.eigh(C0)
            keep = eigvals >= editor.hp.nullspace_threshold
            principal = (eigvecs[:, keep] * eigvals[keep].sqrt()).float()
            P = editor.P[layer].float()
            bound = ((P @ corpus).norm() / corpus.norm()).item()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        editor.edit(stream[:10])
        delta = (weight_view(model, layer) - state[edit_module_path(model, layer) + ".weight"].T).detach()
        model.load_state_dict(state)
        ratios[method] = {
            name: ((delta @ K).norm() / (delta.norm() * K.norm())).item()
            for name, K in (("principal", principal), ("corpus", corpus))
        }
    print("||Delta K0|| / (||Delta|| ||K0||):", ratios, "bound for corpus keys:", bound)
    assert ratios["alphaedit"]["principal"] < 1e-5
    assert ratios["memit"]["principal"] > 100 * ratios["alphaedit"]["principal"]
    assert ratios["alphaedit"]["corpus"] <= bound
    assert ratios["alphaedit"]["corpus"] < 0.01


def test_nullspace_projector_is_a_projector():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    C0 = A @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1e-4, 1e-5, 0.0], dtype=torch.float64)) @ A.T / 10
    P = nullspace_projector(C0, 1e-3)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T)
    assert int(round(torch.trace(P).item())) == (torch.linalg.eigvalsh(C0) < 1e-3).sum().item()
    assert (P @ C0).norm() < 1e-3 * C0.norm()


def test_alphaedit_covariance_of_edited_keys_accumulates_and_round_trips(alphaedit_run):
    _, editor, _, _ = alphaedit_run
    for c in editor.cache_c.values():
        assert c.shape == (512, 512) and torch.trace(c) > 0
    state = editor.state_dict()
    editor.cache_c = {l: torch.zeros_like(c) for l, c in editor.cache_c.items()}
    editor.load_state_dict(state)
    assert all(torch.equal(editor.cache_c[l], state["cache_c"][l]) for l in state["cache_c"])


def test_deltas_reproduce_the_edit_on_a_replica(small_world, stream):
    """An evaluator replica that only receives the deltas ends up with the editor's weights."""
    import copy

    model, tok, world = small_world
    edited, replica = copy.deepcopy(model), copy.deepcopy(model)
    editor = make_editor("alphaedit", LoadedModel(MODEL, edited, tok, world), progress=False)
    for i in range(0, 20, 10):
        as_backbone(replica).apply_deltas(editor.edit(stream[i : i + 10]).deltas)
    for (n, a), (_, b) in zip(edited.named_parameters(), replica.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_ft_edits_within_its_norm_constraint(fresh_small_world, stream):
    model, tok, world = fresh_small_world
    hp = load_hparams("ft", MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = make_editor("ft", LoadedModel(MODEL, model, tok, world), progress=False)
    result = editor.edit(stream[:10])
    after = summarize(case_metrics(model, tok, stream[:10]))
    print("FT on 10 edits:", after, result.stats)
    assert after["efficacy"] >= 0.8
    for d in result.deltas.values():
        assert d.abs().max() <= hp.norm_constraint + 1e-7
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(result.deltas)


def test_hparams_errors_name_the_field():
    with pytest.raises(HParamsError, match="editor.hparams.L2"):
        load_hparams("alphaedit", MODEL, {"L2": "lots"})
    with pytest.raises(HParamsError, match="editor.hparams.no_such_knob"):
        load_hparams("alphaedit", MODEL, {"no_such_knob": 1})
    with pytest.raises(HParamsError, match="layers"):
        load_hparams("memit", "some/unknown-model")
    with pytest.raises(HParamsError, match="unknown editing method"):
        load_hparams("rome2", MODEL)
    assert load_hparams("alphaedit", MODEL, {"L2": 3}).L2 == 3


def test_rows_per_pass_is_read_under_its_old_name_with_a_deprecation_message():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped defaults use the new name
        assert load_hparams("ultraedit", MODEL).rows_per_pass == 25
        assert load_hparams("memit", MODEL, {"rows_per_pass": 8}).rows_per_pass == 8
    with pytest.warns(FutureWarning, match="editor.hparams.batch_size is deprecated: .*rows_per_pass"):
        assert load_hparams("ultraedit", MODEL, {"batch_size": 8}).rows_per_pass == 8
    with pytest.raises(HParamsError, match="editor.hparams.batch_size: the old name of rows_per_pass"):
        load_hparams("memit", MODEL, {"batch_size": 8, "rows_per_pass": 8})


def test_the_registry_refuses_a_taken_name_and_suggests_close_ones():
    from lme_sim.editors import EDITORS, Editor, editor_class, register

    memit = editor_class("memit")

    class Impostor(Editor):
        method = "memit"

    with pytest.raises(ValueError, match="'memit' is already registered by lme_sim.editors.memit.MEMIT"):
        register(Impostor)
    assert EDITORS["memit"] is memit and register(memit) is memit  # the same class again is fine
    with pytest.raises(KeyError, match="'alphaedt' \\(did you mean 'alphaedit'\\? known: alphaedit, "):
        editor_class("alphaedt")
    with pytest.raises(KeyError, match="'zzz' \\(known: "):
        editor_class("zzz")


def test_keys_are_the_mean_of_each_context_groups_mean_as_published(small_world):
    """MEMIT's and AlphaEdit's published compute_ks: the bare prompt is one group, each generated
    (length, count) another; a key is the mean of the groups' means (with [[10, 5]]: 1/2 and 1/10 x 5)."""
    from lme_sim.editors.activations import activations_at, compute_keys, context_groups, contextual

    assert context_groups([(10, 5)]) == [1, 5]
    assert context_groups([(5, 10), (10, 0), (10, 10)]) == [1, 10, 10]
    assert context_groups([]) == [1]
    model, tok, world = small_world
    cases = world.edit_cases(3, seed=5)
    contexts = ["{}", "The job of . {}", "I think . {}", "You see . {}"]
    texts, subjects = contextual(cases, contexts)
    acts = activations_at(model, tok, texts, subjects, [2], kind="key")[2].view(3, 4, -1)
    published = (acts[:, 0] + acts[:, 1:].mean(1)) / 2  # mean over [["{}"], [3 prefixes]] of group means
    got = compute_keys(model, tok, cases, [2], contexts, groups=[1, 3])[2]
    assert torch.allclose(got, published, atol=1e-6)
    assert not torch.allclose(acts.mean(1), published, atol=1e-3)  # the equal-weight mean is another key
    assert torch.allclose(compute_keys(model, tok, cases, [2], contexts)[2], acts.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="do not add up"):
        compute_keys(model, tok, cases, [2], contexts, groups=[1, 2])
    editor = make_editor("memit", LoadedModel(MODEL, model, tok, world), progress=False)
    assert editor.context_groups == context_groups(editor.hp.context_templates)
    assert sum(editor.context_groups) == len(editor.contexts)
