"""UltraEdit: the math without Ray, the answer-token signals, editing the small world on 1 and 3 shards."""

import copy

import torch
import torch.nn.functional as F

from lme_sim.arch import edit_module_path
from lme_sim.backbone import LocalBackbone, Plan, Positions
from lme_sim.editors import make_editor
from lme_sim.editors.edit_signals import answer_keys_and_grads, keys_and_grads
from lme_sim.editors.hypernet import RunningNorm, ridge_delta
from lme_sim.editors.ultraedit import normalize, pseudo_values, shape_key, ultraedit_delta, update_normalizers
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel
from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers
from lme_sim.tokens import encode_pairs

MODEL = "world:small"


def _signals(n=9, d_ff=12, d_model=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d_ff, generator=g, dtype=torch.float64) * 3 + 1,
        torch.randn(n, d_model, generator=g, dtype=torch.float64) * 0.01,
    )


def test_pseudo_values_formula():
    k_hat = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    g_hat = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, 1.0]])
    v = pseudo_values(k_hat, g_hat, lr=0.1)
    assert torch.allclose(v, torch.tensor([[-0.5, 0.5, -1.0], [-0.45, 0.0, -0.9]]))


def test_solve_is_ridge_on_raw_keys():
    K, G = _signals()
    norm = RunningNorm(K.shape[1] + G.shape[1]).double()
    norm.update(torch.cat([K, G], -1))
    k_hat, g_hat = normalize(norm, K, G)
    V = -1e-3 * (k_hat**2).sum(-1, keepdim=True) * g_hat
    direct = torch.linalg.solve(K.T @ K + torch.eye(K.shape[1], dtype=K.dtype), K.T @ V)  # (d_ff, d_model)
    assert torch.allclose(ultraedit_delta(norm, K, G, lr=1e-3), direct.T, atol=1e-10)
    assert torch.allclose(ridge_delta(K, V, 1.0), direct.T, atol=1e-10)


def test_normalizer_is_updated_before_it_is_applied():
    (K1, G1), (K2, G2) = _signals(seed=1), _signals(seed=2)
    norms: dict = {}
    update_normalizers(norms, {3: K1}, {3: G1})
    update_normalizers(norms, {3: K2}, {3: G2})
    (norm,) = norms.values()
    X = torch.cat([torch.cat([K1, G1], -1), torch.cat([K2, G2], -1)])
    assert norm.count == len(X)
    assert torch.allclose(norm.mean, X.mean(0)) and torch.allclose(norm.std, X.std(0, unbiased=False))
    k_hat, _ = normalize(norm, K2, G2)  # the stats include the batch being normalized
    assert torch.allclose(k_hat, (K2 - X[:, :12].mean(0)) / X[:, :12].std(0, unbiased=False))


def test_one_normalizer_per_weight_shape():
    (K1, G1), (K2, G2), (K3, G3) = _signals(seed=1), _signals(seed=2), _signals(d_ff=7, seed=3)
    norms: dict = {}
    update_normalizers(norms, {1: K1, 2: K2, 5: K3}, {1: G1, 2: G2, 5: G3})
    assert sorted(norms) == sorted({shape_key(K1, G1), shape_key(K3, G3)}) == ["5x12", "5x7"]
    shared = norms["5x12"]
    assert shared.count == len(K1) + len(K2)  # the two 5x12 modules feed the same statistics
    both = torch.cat([torch.cat([K1, G1], -1), torch.cat([K2, G2], -1)])
    assert torch.allclose(shared.mean, both.mean(0))


def test_answer_tokens_only(small_world):
    model, tok, world = small_world
    cases = world.edit_cases(6, seed=3)
    batch = encode_pairs(tok, [c.prompt for c in cases], [f"{c.target_new} {c.target_true}" for c in cases])
    layers = [1, 3]
    sig = answer_keys_and_grads(model, batch, layers)
    rows, pos, labels = batch.target_positions()
    assert len(sig.owner) == int(batch.target_len.sum()) == len(rows) and torch.equal(sig.owner, rows)
    read = LocalBackbone(model).run(
        batch.input_ids, batch.attention_mask, Plan(keys={l: Positions(rows, pos) for l in layers})
    )
    # gradient of the mean CE over the answer tokens, taken by hand at every position
    outs = {}

    def tap(_m, _a, o, l):
        outs[l] = torch.zeros_like(o, requires_grad=True)  # d loss / d zero = d loss / d out
        return o + outs[l]

    handles = [
        model.get_submodule(edit_module_path(model, l)).register_forward_hook(
            lambda m, a, o, l=l: tap(m, a, o, l)
        )
        for l in layers
    ]
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = F.cross_entropy(logits[rows, pos], labels)
        full = torch.autograd.grad(loss, [outs[l] for l in layers])
    finally:
        for h in handles:
            h.remove()
    for l, g in zip(layers, full):
        assert torch.allclose(sig.keys[l], read.keys[l], atol=1e-6)
        assert torch.allclose(sig.grads[l], g[rows, pos], atol=1e-7)
    assert len(rows) < int(batch.attention_mask.sum()) - len(batch)  # real positions were left out
    chunked = answer_keys_and_grads(model, batch, layers, chunk=2)  # sorted by length, 3 passes
    via_mode = keys_and_grads(model, batch, layers, tokens="answers")
    for l in layers:
        assert torch.allclose(chunked.keys[l], sig.keys[l], atol=1e-6)
        assert torch.allclose(chunked.grads[l], sig.grads[l], atol=1e-7)
        assert torch.equal(via_mode.grads[l], sig.grads[l])
    assert torch.allclose(chunked.loss, sig.loss, atol=1e-5)


def test_editor_updates_then_applies_and_state_round_trips(fresh_small_world):
    model, tok, world = fresh_small_world
    cases = world.edit_cases(20, seed=4)
    reference = copy.deepcopy(model)
    editor = make_editor("ultraedit", LoadedModel(MODEL, model, tok, world), progress=False)
    layers = list(editor.hp.layers)
    result = editor.edit(cases[:10])
    assert editor.norms == {}  # two-phase: the batch's normalizer is pending until the guard accepts it
    editor.commit()
    batch = encode_pairs(tok, [c.prompt for c in cases[:10]], [c.target_new for c in cases[:10]])
    sig = answer_keys_and_grads(reference, batch, layers)
    norms: dict = {}
    update_normalizers(norms, sig.keys, sig.grads)
    (norm,) = norms.values()  # every edited c_proj of the world has one shape
    assert editor.norms.keys() == norms.keys()
    assert editor.norms[shape_key(sig.keys[layers[0]], sig.grads[layers[0]])].count == norm.count
    for l in layers:
        expected = ultraedit_delta(norm, sig.keys[l], sig.grads[l], editor.hp.lr).float()
        stored = result.deltas[LocalBackbone(model).edit_param_name(l)]
        assert torch.allclose(stored.T, expected, atol=1e-6)  # GPT-2's Conv1D keeps W transposed

    state = editor.state_dict()
    twin = make_editor("ultraedit", LoadedModel(MODEL, copy.deepcopy(model), tok, world), progress=False)
    twin.load_state_dict(state)
    editor.edit(cases[10:])  # the state taken before must not move with the editor
    editor.commit()
    for name, buffers in state["normalizers"].items():
        for k, v in buffers.items():
            assert torch.equal(twin.norms[name].state_dict()[k], v)
        assert not torch.equal(editor.norms[name].count, buffers["count"])
    restored = make_editor("ultraedit", LoadedModel(MODEL, copy.deepcopy(model), tok, world), progress=False)
    restored.load_state_dict(editor.state_dict())
    assert all(torch.equal(restored.norms[n].mean, editor.norms[n].mean) for n in editor.norms)


def test_ultraedit_flips_answers_on_the_world(fresh_small_world):
    model, tok, world = fresh_small_world
    cases = world.edit_cases(10, seed=5)
    before = summarize(case_metrics(model, tok, cases))
    make_editor("ultraedit", LoadedModel(MODEL, model, tok, world), progress=False).edit(cases)
    after = summarize(case_metrics(model, tok, cases))
    print("UltraEdit world 10 edits: before", before, "after", after)
    assert after["efficacy"] >= before["efficacy"] + 0.5


def test_ultraedit_same_on_1_and_3_shards(small_world):
    model, tok, world = small_world
    cases = world.edit_cases(20, seed=0)
    runs = {}
    for n in (1, 3):
        bb = ShardedBackbone([ModelShard(copy.deepcopy(model), r) for r in split_layers(4, n)])
        editor = make_editor("ultraedit", LoadedModel(MODEL, bb, tok, world), progress=False)
        runs[n] = [editor.edit(cases[i : i + 10]).deltas for i in (0, 10)]
    for b1, b3 in zip(runs[1], runs[3]):
        assert b1.keys() == b3.keys()
        for k in b1:
            assert b1[k].abs().max() > 0
            assert torch.allclose(b1[k], b3[k], atol=1e-5, rtol=1e-4), k


def test_shard_taps_return_only_tap_gradients(small_world):
    """A shard whose taps are all its own does not differentiate its input hidden states."""
    model, tok, world = small_world
    cases = world.edit_cases(4, seed=6)
    batch = encode_pairs(tok, [c.prompt for c in cases], [c.target_new for c in cases])
    rows, pos, labels = batch.target_positions()
    bb = ShardedBackbone([ModelShard(copy.deepcopy(model), r) for r in split_layers(4, 2)])
    keys, grads, nll = bb.keys_and_output_grads(
        batch.input_ids, batch.attention_mask, Positions(rows, pos), labels, [2, 3]
    )
    local = LocalBackbone(model).keys_and_output_grads(
        batch.input_ids, batch.attention_mask, Positions(rows, pos), labels, [2, 3]
    )
    for l in (2, 3):
        assert torch.allclose(keys[l], local[0][l], atol=1e-6)
        assert torch.allclose(grads[l], local[1][l], atol=1e-6)
    assert torch.allclose(nll, local[2], atol=1e-5)
    assert all(not s._graphs for s in bb.shards)  # no graph left behind
