"""RLEdit and HiEdit: the networks' math, training over edit sequences on the small world's train
split, and sequential editing of a held-out stream (the world's eval split)."""

import copy

import pytest
import torch
import yaml

from lme_sim.arch import edit_module_path
from lme_sim.backbone import LocalBackbone
from lme_sim.editors import make_editor
from lme_sim.editors.edit_signals import keys_and_grads, per_row_nll
from lme_sim.editors.editor_training import TrainingJob, save_checkpoint, train_editor
from lme_sim.editors.hparams import load_hparams
from lme_sim.editors.hypernet import RunningNorm, ridge_delta, top_k_mask
from lme_sim.editors.rledit import CheckpointMismatch
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel
from lme_sim.tokens import encode_pairs

MODEL = "world:small"
# the shipped world hyperparameters: 200 rollouts each, RLEdit ~5 min and HiEdit ~7 min at one thread
# (conftest); at 100 rollouts HiEdit's efficacy falls below RLEdit's (0.74 vs 0.78)
TRAIN = {}
FEW = {"rollouts": 1, "rollout_batches": 2, "locality_prompts": 8}  # the tiny training of the hand-over tests


def _job(method, hp, small_world):
    """The training job of ``method`` with ``hp`` on the small world (its train split), quietly."""
    model, tok, world = small_world
    return TrainingJob(
        method=method, hp=hp, model=model, tok=tok, model_name=MODEL, world=world, progress=False
    )


def test_ridge_delta_is_the_regularized_least_squares_fit():
    K, V = torch.randn(6, 20, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    D = ridge_delta(K, V, torch.tensor(1e-9, dtype=torch.float64))
    assert torch.allclose(D @ K.T, V.T, atol=1e-6)  # fewer tokens than inputs: an exact fit
    lam = torch.tensor(0.7, dtype=torch.float64)
    D = ridge_delta(K, V, lam)
    normal = D @ (K.T @ K + lam * torch.eye(20, dtype=torch.float64)) - V.T @ K  # normal equations
    assert normal.abs().max() < 1e-10


def test_a_module_leaves_the_tokens_of_edits_that_did_not_pick_it_unchanged():
    """HiEdit's mask zeroes value shifts only: the other tokens stay in the ridge system as
    'change nothing here' rows (exactly, when the system can be fit)."""
    from lme_sim.editors.hypernet import HyperNet

    torch.manual_seed(0)
    net = HyperNet(d_ff=32, d_model=8, n_modules=2, rank=4).double()
    net.log_lambda.data.fill_(-25.0)  # ~no ridge: an exact fit of 6 tokens in 32 dimensions
    keys, grads = torch.randn(6, 32, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    net.key_norm.update(keys)
    net.grad_norm.update(grads)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1], dtype=torch.float64)
    D = net.delta(keys, grads, 1, mask)
    pk, v = net(keys, grads, 1)
    out = pk @ D.T
    assert out[mask == 0].abs().max() < 1e-6  # unchanged where the edit chose another module
    assert torch.allclose(out[mask == 1], v[mask == 1], atol=1e-6)  # the chosen edits' value shifts


def test_a_weighted_ridge_fit_drops_rows_of_weight_zero_and_keeps_their_gradient():
    """ridge_delta with row weights is the weighted least-squares fit: 0/1 weights give the fit of the
    weight-1 rows alone (HiEdit with fit_others false), and the weights still get a gradient."""
    K, V = torch.randn(8, 20, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    lam = torch.tensor(0.3, dtype=torch.float64)
    rows = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float64, requires_grad=True)
    keep = rows.detach() > 0
    assert torch.allclose(ridge_delta(K, V, lam, rows), ridge_delta(K[keep], V[keep], lam), atol=1e-10)
    c = torch.rand(8, dtype=torch.float64) + 0.1  # any positive weights: the weighted normal equations
    D = ridge_delta(K, V, lam, c)
    normal = D @ (K.T @ (c[:, None] * K) + lam * torch.eye(20, dtype=torch.float64)) - V.T @ (c[:, None] * K)
    assert normal.abs().max() < 1e-10
    ridge_delta(K, V, lam, rows).sum().backward()
    assert rows.grad[~keep].abs().min() > 0  # a dropped row still tells the router what choosing it would do


def test_without_fit_others_a_module_fits_only_the_edits_that_chose_it():
    from lme_sim.editors.hypernet import HyperNet

    torch.manual_seed(0)
    net = HyperNet(d_ff=32, d_model=8, n_modules=2, rank=4).double()
    keys, grads = torch.randn(6, 32, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    net.key_norm.update(keys)
    net.grad_norm.update(grads)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1], dtype=torch.float64)
    keep = mask > 0
    D = net.delta(keys, grads, 1, mask, fit_others=False)
    assert torch.allclose(D, net.delta(keys[keep], grads[keep], 1), atol=1e-10)
    assert not torch.allclose(D, net.delta(keys, grads, 1, mask), atol=1e-3)


def test_batch_routing_writes_every_edit_into_the_one_subset_the_batch_mean_picks():
    """HiEdit with ``route: batch`` (the published code's gate): the router scores the mean features
    of all the batch's tokens once, every edit gets that subset, a chosen module's delta is the fit of
    all the batch's tokens and an unchosen one's is zero."""
    from types import SimpleNamespace

    from lme_sim.editors.hypernet import HyperNet, Router, Routing, plan_deltas

    torch.manual_seed(0)
    net = HyperNet(d_ff=32, d_model=8, n_modules=4, rank=4).double()
    router = Router(40, 4).double()
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    keys = {l: torch.randn(8, 32, dtype=torch.float64) for l in range(4)}
    grads = {l: torch.randn(8, 8, dtype=torch.float64) for l in range(4)}
    for l in range(4):
        net.key_norm.update(keys[l])
        net.grad_norm.update(grads[l])
    sig = SimpleNamespace(keys=keys, grads=grads, owner=owner)
    deltas, mask, log_pi = plan_deltas(
        net, sig, [0, 1, 2, 3], 4, Routing(router=router, top_k=2, route="batch")
    )
    assert mask.shape == (4, 4) and (mask == mask[0]).all() and mask[0].sum() == 2
    scores = router(torch.stack([net.features(keys[l], grads[l]).mean(0) for l in range(4)])[None])
    assert torch.equal(mask[0].nonzero()[:, 0].sort().values, scores[0].topk(2).indices.sort().values)
    assert torch.allclose(log_pi, log_pi[0].expand(4))
    for i in range(4):
        expected = net.delta(keys[i], grads[i], i) if mask[0, i] else torch.zeros(8, 32, dtype=torch.float64)
        assert torch.allclose(deltas[i], expected, atol=1e-10)
    _, per_edit, _ = plan_deltas(net, sig, [0, 1, 2, 3], 4, Routing(router=router, top_k=2))
    assert per_edit.shape == (4, 4)  # the default routes each edit on its own features


def test_top_k_mask_is_hard_forward_and_passes_gradients():
    scores = torch.randn(5, 4, requires_grad=True)
    mask, log_pi = top_k_mask(scores, 2)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0} and (mask.detach().sum(1) == 2).all()
    assert torch.equal(
        mask.detach().argsort(1, descending=True)[:, :2].sort(1).values,
        scores.detach().topk(2, 1).indices.sort(1).values,
    )
    (mask * torch.arange(4.0)).sum().backward()
    assert scores.grad.abs().sum() > 0
    assert (log_pi < 0).all()


def test_running_norm_matches_the_statistics_of_all_chunks():
    x = torch.randn(300, 7) * 3 + 1
    norm = RunningNorm(7)
    for chunk in x.split(70):
        norm.update(chunk)
    assert torch.allclose(norm.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(norm.std, x.std(0, unbiased=False), atol=1e-5)


def test_keys_and_grads_give_the_weight_gradient(fresh_small_world):
    """sum_t g_t k_t^T over the edit tokens is exactly dL/dW of the edit loss."""
    model, tok, world = fresh_small_world
    cases = world.edit_cases(4, seed=3)
    batch = encode_pairs(tok, [c.prompt for c in cases], [c.target_new for c in cases])
    sig = keys_and_grads(model, batch, [1, 3])
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    per_row_nll(model, batch).sum().backward()
    for l in (1, 3):
        w_grad = model.get_submodule(edit_module_path(model, l)).weight.grad  # Conv1D: (d_ff, d_model)
        assert torch.allclose(sig.keys[l].T @ sig.grads[l], w_grad, atol=1e-5)


def _train_both(small_world, tmp_path_factory, overrides: dict) -> dict:
    """RLEdit and HiEdit trained on the small world's train split (disjoint from its eval split);
    HiEdit starts from the RLEdit network, as `lme-sim train-editor --method hiedit --init-from` does.
    {method: (checkpoint, its file)}."""
    model, tok, world = small_world
    out = {}
    for method in ("rledit", "hiedit"):
        hp = load_hparams(method, MODEL, overrides)
        init = out["rledit"][0] if method == "hiedit" else None
        ckpt = train_editor(_job(method, hp, small_world), init=init)
        t = ckpt["train"]
        print(
            f"{method}: trained {hp.rollouts} rollouts in {t['seconds']:.0f} s, edit loss "
            f"{t['edit_loss'][0]:.3f} -> {sum(t['edit_loss'][-10:]) / 10:.3f}"
        )
        out[method] = (ckpt, save_checkpoint(ckpt, tmp_path_factory.mktemp("ckpt") / f"{method}.pt"))
    return out


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    """The shipped world training (200 rollouts each: ~12 min at one thread), for the quality tests
    (`slow`, `make test-slow`)."""
    return _train_both(small_world, tmp_path_factory, TRAIN)


@pytest.fixture(scope="module")
def trained_few(small_world, tmp_path_factory):
    """A tiny training of both (seconds), for the tests of checkpoints and hand-over rules: what they
    check does not depend on how well the networks edit."""
    return _train_both(small_world, tmp_path_factory, FEW)


STREAMS = (0, 1, 2)  # held-out streams of 100 edits (the eval split's facts toward different new objects)


@pytest.fixture(scope="module")
def held_out_runs(small_world, trained):
    """Each method on the same held-out streams: 100 sequential edits in 10 batches, three times
    (one stream's figures move by ~0.04 from stream to stream, so the comparison uses the mean)."""
    model, tok, world = small_world
    runs = {}
    for method, (_, path) in trained.items():
        for seed in STREAMS:
            stream = world.edit_cases(100, seed=seed, split="eval")
            m = copy.deepcopy(model)
            editor = make_editor(
                method,
                LoadedModel(MODEL, m, tok, world),
                overrides={**TRAIN, "checkpoint": str(path)},
                progress=False,
            )
            results = [editor.edit(stream[i : i + 10]) for i in range(0, 100, 10)]
            runs[method, seed] = (stream, results, summarize(case_metrics(m, tok, stream)))
            print(method, f"stream {seed}: after 100 held-out edits", runs[method, seed][2])
    return runs


def mean_metrics(runs, method: str) -> dict:
    return {
        k: sum(runs[method, s][2][k] for s in STREAMS) / len(STREAMS) for k in ("efficacy", "specificity")
    }


@pytest.mark.slow  # the shipped training: minutes
def test_the_training_split_is_disjoint_from_the_held_out_stream(small_world, held_out_runs):
    world = small_world[2]
    train_subjects = {f.subject for f in world.split_facts("train")}
    for seed in STREAMS:
        stream = held_out_runs["rledit", seed][0]
        assert not train_subjects & {c.subject for c in stream}


@pytest.mark.slow  # the shipped training: minutes
def test_rledit_edits_a_held_out_stream(small_world, held_out_runs):
    stream, _, after = held_out_runs["rledit", 0]
    before = summarize(case_metrics(small_world[0], small_world[1], stream))
    assert before["efficacy"] == 0.0
    assert after["efficacy"] >= 0.8


@pytest.mark.slow  # the shipped training: minutes
def test_hiedit_touches_at_most_half_the_candidate_modules(held_out_runs):
    per_edit = [len(t) for s in STREAMS for r in held_out_runs["hiedit", s][1] for t in r.touched]
    print("HiEdit modules per edit", sum(per_edit) / len(per_edit), "of 4")
    assert sum(per_edit) / len(per_edit) <= 2.0
    assert mean_metrics(held_out_runs, "hiedit")["efficacy"] >= 0.7  # it really edits with half the modules


@pytest.mark.slow  # the shipped training: minutes
def test_hiedit_quality_matches_rledit(held_out_runs):
    """Acceptance: efficacy within 0.02 of RLEdit's or better, specificity at least RLEdit's (means
    over the three streams)."""
    hi, rl = mean_metrics(held_out_runs, "hiedit"), mean_metrics(held_out_runs, "rledit")
    print("mean over streams: HiEdit", hi, "RLEdit", rl)
    assert hi["efficacy"] >= rl["efficacy"] - 0.02
    assert hi["specificity"] >= rl["specificity"]


@pytest.mark.slow  # the shipped training: minutes
def test_router_learns_and_its_choices_vary(trained, held_out_runs):
    ckpt, _ = trained["hiedit"]
    assert ckpt["train"]["router_param_change"] > 1e-3
    choices = {tuple(t) for s in STREAMS for r in held_out_runs["hiedit", s][1] for t in r.touched}
    print("distinct module subsets chosen:", len(choices))
    assert len(choices) >= 2


def test_a_checkpoint_for_another_model_is_refused(small_world, trained_few, tmp_path):
    from lme_sim.models import load_model

    other = load_model("world:default", progress=False)
    _, path = trained_few["rledit"]
    with pytest.raises(CheckpointMismatch, match="trained for model 'world:small'"):
        make_editor(
            "rledit",
            LoadedModel("world:default", other.model, other.tok, other.world),
            overrides={"checkpoint": str(path)},
            progress=False,
        )
    from lme_sim.preflight import load_checked as load_scenario
    from lme_sim.scenario import ScenarioError

    scn = tmp_path / "s.yaml"
    scn.write_text(
        f"name: x\nmodel: world:default\neditor: {{method: rledit, hparams: {{checkpoint: {path}}}}}\n"
    )
    with pytest.raises(ScenarioError, match="editor.hparams.checkpoint"):
        load_scenario(scn)


def test_hiedit_starts_only_from_an_rledit_network_for_the_same_modules(small_world, trained_few):
    model, tok, world = small_world
    rledit, _ = trained_few["rledit"]
    hiedit, _ = trained_few["hiedit"]
    assert hiedit["init"]["hparams"] == rledit["hparams"]
    with pytest.raises(CheckpointMismatch, match="layers"):
        train_editor(
            _job("hiedit", load_hparams("hiedit", MODEL, {"layers": [2, 3]}), small_world), init=rledit
        )
    with pytest.raises(CheckpointMismatch, match="RLEdit checkpoint"):
        train_editor(_job("hiedit", load_hparams("hiedit", MODEL), small_world), init=hiedit)


@pytest.mark.parametrize("scale, expected", [(None, 2.0), (1.0, 1.0), (1.5, 1.5)])
def test_hiedit_starts_from_the_rledit_step_sizes_times_the_handover_scale(small_world, scale, expected):
    """At the hand-over HiEdit's step sizes are the RLEdit start's times ``handover_scale``; by default
    n_candidates / top_k (4 / 2 here), since each edit then writes into half of the modules."""
    model, tok, world = small_world
    rledit = train_editor(_job("rledit", load_hparams("rledit", MODEL, FEW), small_world))
    starts = []
    hp = load_hparams("hiedit", MODEL, {**FEW, "handover_scale": scale})
    train_editor(
        _job("hiedit", hp, small_world),
        init=rledit,
        snapshot_every=1,
        on_snapshot=lambda r, ck: starts.append(ck["net"]["log_lr"]) if r == 0 else None,
    )
    ratio = (starts[0] - rledit["net"]["log_lr"]).exp()
    assert torch.allclose(ratio, torch.full_like(ratio, expected))


def test_the_editor_fits_as_its_checkpoint_was_trained(small_world, tmp_path):
    """A HiEdit checkpoint trained with ``fit_others: false`` edits that way: its deltas are the
    hypernetwork's with the other edits' rows dropped, whatever the scenario's hparams say."""
    from lme_sim.editors.hypernet import Routing, build_networks, plan_deltas

    model, tok, world = small_world
    rledit = train_editor(_job("rledit", load_hparams("rledit", MODEL, FEW), small_world))
    hp = load_hparams("hiedit", MODEL, {**FEW, "fit_others": False})
    ckpt = train_editor(_job("hiedit", hp, small_world), init=rledit)
    path = save_checkpoint(ckpt, tmp_path / "hi.pt")
    facts = world.split_facts("eval")[:6]
    cases = [world.case(f, next(o for o in world.objects[f.relation] if o != f.obj)) for f in facts]
    edited = copy.deepcopy(model)
    editor = make_editor(
        "hiedit", LoadedModel(MODEL, edited, tok), overrides={"checkpoint": str(path)}, progress=False
    )
    batch = encode_pairs(tok, [c.prompt for c in cases], [c.target_new for c in cases])
    signals = keys_and_grads(edited, batch, hp.layers)
    net, router = build_networks(ckpt)
    args = (net, signals, list(hp.layers), len(cases))
    dropped, mask, _ = plan_deltas(*args, Routing(router=router, top_k=ckpt["top_k"], fit_others=False))
    kept, _, _ = plan_deltas(*args, Routing(router=router, top_k=ckpt["top_k"]))
    result = editor.edit(cases)
    for l in hp.layers:
        name = LocalBackbone(edited).edit_param_name(l)
        if name in result.deltas:
            d = result.deltas[name].float()
            d = d if d.shape == dropped[l].shape else d.T  # stored in the parameter's layout
            assert torch.allclose(d, dropped[l].float(), atol=1e-5)
    assert any(not torch.allclose(dropped[l], kept[l], atol=1e-4) for l in hp.layers)


def test_training_neighborhoods_stay_in_the_training_split(small_world):
    """The router's locality reward reads each training edit's neighborhood prompts: they must not
    be facts of held-out subjects."""
    from lme_sim.editors.editor_training import training_cases

    world = small_world[2]
    groups, _ = training_cases(MODEL, world, None, 0)
    train_prompts = {world.prompt(f) for f in world.split_facts("train")}
    neighbors = {p for g in groups for c in g for p, _ in c.neighborhood}
    assert neighbors and neighbors <= train_prompts


def test_train_editor_cli_starts_hiedit_from_a_given_rledit_checkpoint(trained_few, tmp_path):
    from click.testing import CliRunner

    from lme_sim.cli import main

    _, rledit = trained_few["rledit"]
    _, hiedit = trained_few["hiedit"]
    out = tmp_path / "hi.pt"
    args = [
        "train-editor",
        "--method",
        "hiedit",
        "--model",
        MODEL,
        "--hparams",
        "{rollouts: 2}",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, [*args, "--init-from", str(rledit)])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["init"] is not None and ckpt["router"] is not None
    hint = yaml.safe_load(result.output.strip().splitlines()[-1].split("use it with")[1])["editor"]
    assert hint == {"method": "hiedit", "hparams": {"checkpoint": str(out), "layers": ckpt["layers"]}}
    bad = CliRunner().invoke(main, [*args, "--init-from", str(hiedit)])
    assert bad.exit_code == 2 and "--init-from" in bad.output and "not 'rledit'" in bad.output
    wrong = CliRunner().invoke(main, [*args[:2], "rledit", *args[3:], "--init-from", str(rledit)])
    assert wrong.exit_code == 2 and "only HiEdit" in wrong.output


def test_a_training_file_is_used_whole_by_default(tmp_path):
    """``--data`` is a separate training split: nothing held out unless ``holdout`` says so; the
    file's kind (CounterFact flat / ZsRE) is read from its first record."""
    import json

    from lme_sim.editors.editor_training import training_cases

    records = [
        {
            "case_id": i,
            "prompt": f"Subject{i} plays the",
            "subject": f"Subject{i}",
            "target_new": "piano",
            "ground_truth": "guitar",
            "rephrase_prompt": f"Subject{i} is good at the",
            "locality_prompt": f"Other{i} plays the",
            "locality_ground_truth": "drums",
        }
        for i in range(30)
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    assert load_hparams("rledit", "smollm2-135m").holdout == 0
    groups, loc = training_cases("m", None, str(path), 0)
    assert [g[0].case_id for g in groups] == [str(i) for i in range(30)]
    assert loc == [f"Other{i} plays the" for i in range(30)]
    groups, _ = training_cases("m", None, str(path), 5)
    assert groups[0][0].case_id == "5"
    with pytest.raises(ValueError, match="need at least 20"):
        training_cases("m", None, str(path), 15)
    zsre = tmp_path / "zsre.json"
    zsre.write_text(
        json.dumps(
            [
                {
                    "subject": f"S{i}",
                    "src": f"What is S{i}?",
                    "answers": ["x"],
                    "alt": "y",
                    "rephrase": f"Say S{i}?",
                    "loc": "nq question: who",
                    "loc_ans": "z",
                }
                for i in range(20)
            ]
        )
    )
    groups, _ = training_cases("m", None, str(zsre), 0)
    assert len(groups) == 20 and groups[0][0].source == "zsre"


@pytest.mark.parametrize("method", ["rledit", "hiedit"])
def test_a_rollout_from_the_cached_lower_blocks_equals_whole_passes(small_world, method):
    """Training runs the blocks below the lowest edited one once per rollout (``_Rollout``): every
    step's edit loss, the networks' gradients and the deltas written equal those of whole passes
    (start 0). The locality term's ``before``, carried from the previous step's pass, equals a
    fresh pass on the edited model."""
    from lme_sim.editors.editor_training import _NextToken, _Rollout, _Trainer
    from lme_sim.editors.hypernet import HiEditHParams, HyperNet, Router

    model0, tok, world = small_world
    layers = [2, 3]
    hp = HiEditHParams(layers=layers, lookback=2, locality_prompts=8, router_locality=5.0, balance=0.5)
    d_model, d_ff = model0.get_submodule(edit_module_path(model0, 2)).weight.T.shape
    torch.manual_seed(0)
    net0 = HyperNet(d_ff=d_ff, d_model=d_model, n_modules=2, rank=8, n_blocks=2, init_lr=1.0, init_lambda=1.0)
    router0 = Router(d_ff + d_model, 2) if method == "hiedit" else None
    with torch.no_grad():  # residual blocks off zero, so that every parameter shapes the deltas
        for p in list(net0.parameters()) + (list(router0.parameters()) if router0 else []):
            p.add_(0.05 * torch.randn_like(p))
    facts = world.split_facts("train")
    cases = world.edit_cases(12, seed=4, split="train")
    batches = [cases[i : i + 4] for i in range(0, 12, 4)]
    loc = [world.prompt(f) for f in facts[:8]]

    def rollout(start: int):
        """trainer.rollout's steps, with the rollout's rows at hand."""
        model, net, router = copy.deepcopy(model0), copy.deepcopy(net0), copy.deepcopy(router0)
        trainer = _Trainer(
            model, tok, net, router, 1 if router else None, hp, torch.Generator().manual_seed(0)
        )
        trainer.start = start
        rows = _Rollout.prepare(model, tok, batches, loc, start, neighbors=3 if router is not None else 0)
        unrelated = _NextToken(model, rows.unrelated)
        losses = [trainer.step(batches, rows, unrelated, t) for t in range(len(batches))]
        params = list(net.parameters()) + (list(router.parameters()) if router else [])
        return model, losses, [p.grad.clone() for p in params], unrelated

    model_c, losses_c, grads_c, unrelated = rollout(2)
    model_w, losses_w, grads_w, _ = rollout(0)
    assert unrelated.rows.hidden is not None  # the cached path really ran from block 2
    assert losses_c == pytest.approx(losses_w, rel=1e-5)
    for gc, gw in zip(grads_c, grads_w):
        assert torch.allclose(gc, gw, rtol=1e-4, atol=1e-6)
    for l in layers:
        w = model_w.get_submodule(edit_module_path(model_w, l)).weight
        assert torch.allclose(model_c.get_submodule(edit_module_path(model_c, l)).weight, w, atol=1e-6)
    fresh = _NextToken(model_c, unrelated.rows).before  # a pass on the model with every delta written
    assert torch.allclose(unrelated.before, fresh, atol=1e-5)


def test_a_rollout_applied_in_parts_adds_up_to_its_whole_gradient(small_world):
    """``steps_per_update``: a rollout of 4 steps in parts of 2 steps the optimizer twice, and (the
    networks held still by a zero learning rate) its parts' gradients add up to the gradient that the
    whole rollout applies at once: no step's gradient is lost, counted twice or left for the next part."""
    from lme_sim.editors.editor_training import _Trainer
    from lme_sim.editors.hypernet import HyperNet, RLEditHParams

    model0, tok, world = small_world
    cases = world.edit_cases(16, seed=5, split="train")
    batches = [cases[i : i + 4] for i in range(0, 16, 4)]
    loc = [world.prompt(f) for f in world.split_facts("train")[:8]]
    d_model, d_ff = model0.get_submodule(edit_module_path(model0, 2)).weight.T.shape
    torch.manual_seed(0)
    net0 = HyperNet(d_ff=d_ff, d_model=d_model, n_modules=2, rank=8, n_blocks=2, init_lr=1.0, init_lambda=1.0)
    with torch.no_grad():  # residual blocks off zero, so that every parameter shapes the deltas
        for p in net0.parameters():
            p.add_(0.05 * torch.randn_like(p))

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            self.seen.append([p.grad.clone() for p in self.param_groups[0]["params"]])

    def rollout(steps_per_update: int) -> list[list[torch.Tensor]]:
        hp = RLEditHParams(layers=[2, 3], lookback=2, locality_prompts=8, steps_per_update=steps_per_update)
        model, net = copy.deepcopy(model0), copy.deepcopy(net0)
        opt = Recording(net.parameters(), lr=0.0)
        opt.seen = []
        _Trainer(model, tok, net, None, None, hp, torch.Generator()).rollout(batches, loc, opt)
        return opt.seen

    (whole,), parts = rollout(0), rollout(2)
    assert len(parts) == 2
    for w, a, b in zip(whole, *parts):
        assert w.abs().max() > 0
        assert torch.allclose(a + b, 2 * w, rtol=1e-4, atol=1e-7)  # parts average 2 steps, the whole 4
        assert not torch.allclose(a, b, rtol=1e-2)


def _one_step_grads(small_world, **hparams) -> list[torch.Tensor]:
    """The networks' gradients after the first step of a rollout (a fixed, slightly perturbed network)."""
    from lme_sim.editors.editor_training import _NextToken, _Rollout, _Trainer
    from lme_sim.editors.hypernet import HyperNet, RLEditHParams

    model0, tok, world = small_world
    batches = [world.edit_cases(4, seed=6, split="train")]
    loc = [world.prompt(f) for f in world.split_facts("train")[:8]]
    d_model, d_ff = model0.get_submodule(edit_module_path(model0, 2)).weight.T.shape
    torch.manual_seed(0)
    net = HyperNet(d_ff=d_ff, d_model=d_model, n_modules=2, rank=8, n_blocks=2, init_lr=1.0, init_lambda=1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hp = RLEditHParams(layers=[2, 3], locality_prompts=8, **hparams)
    model = copy.deepcopy(model0)
    trainer = _Trainer(model, tok, net, None, None, hp, torch.Generator())
    rows = _Rollout.prepare(model, tok, batches, loc, trainer.start, neighbors=0)
    trainer.step(batches, rows, _NextToken(model, rows.unrelated), 0)
    return [p.grad.clone() for p in net.parameters()], net, trainer


def test_the_l2_term_adds_the_gradient_of_the_squared_deltas(small_world):
    """``reg``: the step loss gains reg * sum_l ||Delta_l||_F^2 (RLEdit's published L2 term), and the
    gradient exactly that term's gradient, on top of the loss without it."""
    from lme_sim.editors.edit_signals import keys_and_grads
    from lme_sim.editors.hypernet import plan_deltas

    plain, _, _ = _one_step_grads(small_world)
    reg, net, trainer = _one_step_grads(small_world, reg=0.3)
    net.zero_grad()
    model0, tok, world = small_world
    cases = world.edit_cases(4, seed=6, split="train")
    pairs = encode_pairs(tok, [c.prompt for c in cases], [c.target_new for c in cases])
    sig = keys_and_grads(model0, pairs, [2, 3])
    deltas, _, _ = plan_deltas(net, sig, [2, 3], len(cases))
    (0.3 * sum(d.pow(2).sum() for d in deltas.values())).backward()
    extra = [p.grad for p in net.parameters()]
    assert any(e.abs().max() > 0 for e in extra)
    for a, b, e in zip(plain, reg, extra):
        assert torch.allclose(b, a + e, rtol=1e-3, atol=1e-6)


def test_a_diverging_training_stops_with_one_error_line(small_world, tmp_path):
    """Deltas that break the model (here a step size of 1e30) end training with one ``error:`` line
    naming the rollout, exit 1, and no checkpoint, instead of a linear-algebra traceback."""
    from click.testing import CliRunner

    from lme_sim.cli import main

    out = tmp_path / "net.pt"
    hp = "{init_lr: 1.0e+30, rollouts: 2, rollout_batches: 4, locality_prompts: 8}"
    args = ["train-editor", "--method", "rledit", "--model", MODEL, "--hparams", hp, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: training rledit diverged in rollout 1")
    assert not out.exists()


def test_a_failing_ridge_solve_in_training_is_the_same_one_error_line(small_world, tmp_path, monkeypatch):
    """Pseudo keys can be finite and still too large for the ridge system (a singular solve, seen on
    SmolLM2 with 50-batch rollouts): that too ends training with the divergence error, not a traceback."""
    from click.testing import CliRunner

    from lme_sim.cli import main
    from lme_sim.editors import hypernet

    def singular(*a, **k):
        raise torch.linalg.LinAlgError("linalg.solve: the input matrix is singular")

    monkeypatch.setattr(hypernet, "ridge_delta", singular)
    out = tmp_path / "net.pt"
    hp = "{rollouts: 2, rollout_batches: 4, locality_prompts: 8}"
    args = ["train-editor", "--method", "rledit", "--model", MODEL, "--hparams", hp, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: training rledit diverged in rollout 1: at step 1 of 4 the ridge solve")
    assert not out.exists()


def test_a_real_model_needs_a_checkpoint_or_an_existing_training_file():
    """Without a checkpoint, RLEdit on a model with no embedded world trains on ``train_data``: one
    error line naming the field when neither is usable (before any model loads)."""
    from lme_sim.editors.hparams import HParamsError
    from lme_sim.editors.rledit import RLEdit

    hp = load_hparams("rledit", "smollm2-135m", {"train_data": None, "train_source": None})
    with pytest.raises(HParamsError, match=r"^editor.hparams.checkpoint: rledit on 'smollm2-135m' needs"):
        RLEdit.check_hparams("smollm2-135m", hp, "editor.hparams")
    hp = load_hparams("rledit", "smollm2-135m", {"train_source": "counterfact-tran"})
    with pytest.raises(HParamsError, match=r"^editor.hparams.train_source: 'counterfact-tran' is not a"):
        RLEdit.check_hparams("smollm2-135m", hp, "editor.hparams")
    both = r"^editor.hparams.train_source: give train_data .a file. or train_source .a dataset., not both"
    with pytest.raises(HParamsError, match=both):
        load_hparams("rledit", "smollm2-135m", {"train_data": "x.json"})  # the default names a dataset
    hp = load_hparams("rledit", "smollm2-135m", {"train_data": "missing.json", "train_source": None})
    with pytest.raises(HParamsError, match=r"^editor.hparams.train_data: file 'missing.json' not found"):
        RLEdit.check_hparams("smollm2-135m", hp, "editor.hparams")


def test_the_cache_keys_networks_by_model_and_training_hyperparameters(small_world):
    from lme_sim.editors.editor_training import checkpoint_path

    model, _, _ = small_world
    hp = load_hparams("rledit", MODEL)
    path = checkpoint_path("rledit", MODEL, hp, model)
    assert checkpoint_path("rledit", MODEL, load_hparams("rledit", MODEL), model) == path
    assert checkpoint_path("rledit", MODEL, hp.model_copy(update={"checkpoint": "x.pt"}), model) == path
    assert checkpoint_path("rledit", MODEL, hp.model_copy(update={"lookback": 1}), model) != path
    assert checkpoint_path("hiedit", MODEL, hp, model) != path


def test_a_real_model_s_networks_are_keyed_by_the_training_file_s_content(small_world, tmp_path):
    """The same training file at two paths (or as a named dataset) finds the same cached networks;
    other content, other networks. The shipped SmolLM2 default trains on the named dataset."""
    from lme_sim.editors.editor_training import checkpoint_path
    from lme_sim.preflight import named_datasets
    from lme_sim.scenario import Scenario

    model = small_world[0]  # only its fingerprint is read
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text("[1]")
    b.write_text("[1]")
    c.write_text("[2]")
    key = {
        f.name: checkpoint_path(
            "rledit",
            "smollm2-135m",
            load_hparams("rledit", "smollm2-135m", {"train_data": str(f), "train_source": None}),
            model,
        )
        for f in (a, b, c)
    }
    assert key["a.json"] == key["b.json"] != key["c.json"]
    assert load_hparams("rledit", "smollm2-135m").train_source == "counterfact-train"
    scn = Scenario.model_validate(
        {"name": "x", "model": "smollm2-135m", "editor": [{"method": "rledit"}, {"method": "hiedit"}]}
    )
    assert named_datasets(scn) == ["counterfact-train"]  # `lme-sim run` downloads it first
    with_ckpt = scn.with_editor(scn.editors[0].model_copy(update={"hparams": {"checkpoint": "n.pt"}}))
    assert named_datasets(with_ckpt) == []  # a given checkpoint trains nothing
