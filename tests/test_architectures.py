"""Every architecture of lme_sim.arch.ARCHS, plus Gemma 3's image-text wrapper, as tiny random models
built from transformers' config classes (lme_sim.random_models: 4 blocks of width 64, sliding windows of
4 tokens where the architecture has them; nothing downloaded), with the small world's tokenizer, so that
the world's edit cases and key statistics apply.

Per architecture: the probe plans' logits (Gemma 2's final soft cap included) and the scores from the
shared-prompt passes equal the model's own forward; the suffix passes (per-row positions, prefix KV
cache, sliding windows) give the full passes' logits and gradients; MEMIT's and AlphaEdit's deltas on the
suffix path equal the reference passes' to 1e-4 (relative); every editor writes finite deltas that change
the weights; and a model saved as a folder, loaded by ``load_model(folder)`` in two Ray shard actors,
gets the in-process deltas. The learned editors (RLEdit, HiEdit) run with networks trained for one
rollout of one batch (what their code allows without a checkpoint): this checks that they run on the
architecture, not what they learn.

Kept to about a minute of ``make test``: every test in process runs on every architecture; shard actors
(seconds to start each) run for one editor per family by default (GPT-2; GPT-J and GPT-NeoX's parallel
blocks; Llama-like; Gemma 2 and 3 with their extra norms and sliding windows), the other pairs under
``-m slow``."""

import copy
import dataclasses
import functools

import pytest
import torch

from lme_sim.arch import ARCHS, arch_of
from lme_sim.backbone import Inject, LocalBackbone, Plan, Positions
from lme_sim.editors import known_methods, make_editor
from lme_sim.editors.targets import _RowBatch
from lme_sim.models import LoadedModel, ModelError, load_model, text_only
from lme_sim.random_models import TINY, random_model, tiny_config
from lme_sim.scoring import logits_at, score_by_prompt, score_each
from lme_sim.suffix import supports_suffix
from lme_sim.tokens import encode_pairs

ARCH_TYPES = sorted(TINY)
WORLD = "world:small"  # the hyperparameters' family: layers 1-2 (MEMIT, AlphaEdit), 2-3 (UltraEdit), ...
CONTEXTS = ["{}", "The job of . {}"]
# cheap settings: a few optimizer steps, 1-rollout networks (see the module docstring)
CHEAP = {
    "memit": {"v_num_grad_steps": 6},
    "alphaedit": {"v_num_grad_steps": 6},
    "mose": {"num_steps": 3},
    "ft": {"num_steps": 3},
    "ultraedit": {},
    "rledit": {"rollouts": 1, "rollout_batches": 1, "edits_per_batch": 4, "rank": 8, "locality_prompts": 4},
}
CHEAP["hiedit"] = CHEAP["rledit"]
# one editor per family on shards by default; every other (architecture, editor) pair under -m slow
ON_SHARDS = {"gpt2": "alphaedit", "gptj": "memit", "gpt_neox": "ultraedit", "llama": "alphaedit"}
ON_SHARDS |= {"gemma2": "memit", "gemma3_text": "ultraedit", "gemma3": "alphaedit"}


@pytest.fixture(scope="module")
def tok_world(small_world):
    _, tok, world = small_world
    return tok, world


@functools.cache
def _tiny(model_type: str, tok) -> torch.nn.Module:
    return random_model(tiny_config(model_type, tok))


def tiny(model_type: str, tok) -> torch.nn.Module:
    """A private copy of the tiny random ``model_type`` model (built once per session), safe to edit."""
    return copy.deepcopy(_tiny(model_type, tok))


def _ragged(cases, extra):
    """Words after the subject and two-token targets, so that suffixes differ in length."""
    return [
        dataclasses.replace(
            c,
            prompt=c.prompt + extra[i % len(extra)],
            target_new=f"{c.target_new} {c.target_true}" if i % 3 else c.target_new,
        )
        for i, c in enumerate(cases)
    ]


def test_every_architecture_in_the_table_has_a_tiny_model():
    assert set(TINY) == set(ARCHS)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_plans_and_shared_prompt_scores_equal_the_models_forward(tok_world, model_type):
    tok, world = tok_world
    model = _tiny(model_type, tok)
    assert supports_suffix(model)
    cases = _ragged(world.edit_cases(6, seed=1), ["", " is the job of", " and"])
    enc = tok([c.prompt for c in cases], return_tensors="pt", padding=True)
    rows, pos = torch.arange(len(cases)), enc["attention_mask"].sum(1) - 1
    out = LocalBackbone(model).run(enc["input_ids"], enc["attention_mask"], Plan(logits=Positions(rows, pos)))
    with torch.no_grad():
        full = model(**enc).logits[rows, pos].float()
    assert torch.allclose(out.logits, full, atol=1e-5)
    batch = encode_pairs(
        tok, [c.prompt for c in cases] * 2, [c.target_new for c in cases] + [c.target_true for c in cases]
    )
    shared, each = score_by_prompt(model, batch), score_each(model, batch)
    assert torch.allclose(shared.mean_logprob, each.mean_logprob, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_suffix_logits_and_gradients_equal_full_pass(tok_world, model_type):
    """Words after the subject reach past the 4-token windows: the suffixes attend across them."""
    tok, world = tok_world
    model = _tiny(model_type, tok)
    cases = _ragged(world.edit_cases(6, seed=2), ["", " is the job of", " and"])
    rw = _RowBatch.build(tok, cases, CONTEXTS, "{} is a")
    bb, layer = LocalBackbone(model), 1
    handle, _ = rw.prefix(bb, layer)
    sel = torch.arange(len(rw.owner))
    rows, pos = torch.cat([sel, rw.tgt_row]), torch.cat([rw.subj_pos, rw.tgt_pos])
    got = []
    for suffix in (False, True):
        values = torch.randn(len(sel), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        values.requires_grad_(True)
        if suffix:
            logits = bb.suffix_logits(handle, sel, values, Positions(rows, pos - rw.subj_pos[rows]))
        else:
            logits = logits_at(
                model,
                rw.ids,
                rw.mask,
                Positions(rows, pos),
                inject=Inject(layer, Positions(sel, rw.subj_pos), values),
            )
        logits.logsumexp(-1).sum().backward()
        got.append((logits.detach(), values.grad))
    (a, ga), (b, gb) = got
    assert torch.allclose(a, b, atol=1e-4)
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-5)


def test_a_mask_without_the_sliding_window_gives_other_scores(tok_world, monkeypatch):
    """The windows above matter: with every block's window ignored, Mistral's shared-prompt scores
    (suffixes attending to their prompts' cache) no longer equal its forward."""
    import lme_sim.suffix

    tok, world = tok_world
    model = _tiny("mistral", tok)
    cases = world.edit_cases(6, seed=1)
    batch = encode_pairs(
        tok, [c.prompt for c in cases], [f"{c.target_new} {c.target_true} and" for c in cases]
    )
    monkeypatch.setattr(lme_sim.suffix, "attention_window", lambda model, layer: None)
    shared, each = score_by_prompt(model, batch), score_each(model, batch)
    assert not torch.allclose(shared.mean_logprob, each.mean_logprob, atol=1e-3)


def _check_deltas(before: torch.nn.Module, after: torch.nn.Module, deltas: dict) -> None:
    """Finite, non-zero deltas, each the change of its parameter."""
    assert deltas
    params = dict(before.named_parameters())
    for name, d in after.named_parameters():
        if name in deltas:
            assert torch.isfinite(deltas[name]).all() and deltas[name].abs().sum() > 0, name
            assert torch.allclose(d - params[name], deltas[name], atol=1e-6), name
        else:
            assert torch.equal(d, params[name]), name


@pytest.mark.parametrize("method", sorted(CHEAP))
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_each_editor_edits_each_architecture(tok_world, model_type, method):
    tok, world = tok_world
    model = tiny(model_type, tok)
    before = copy.deepcopy(model)
    editor = make_editor(
        method, LoadedModel(WORLD, model, tok, world), overrides=CHEAP[method], progress=False
    )
    result = editor.edit(world.edit_cases(4, seed=3))
    _check_deltas(before, model, result.deltas)


def test_every_editor_is_covered():
    assert set(CHEAP) == set(known_methods())


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_suffix_path_deltas_equal_reference_passes(tok_world, model_type, method):
    """6 target steps (12 in tests/test_suffix.py): on these random models float32 rounding differences
    between the paths grow with the steps, as test_suffix.py describes for the world model; at 6 steps
    the largest is 3e-5 (OLMo 2's MEMIT), at 12 Llama's reaches 4e-4. Words after the subject stay within
    the 4-token windows: a target beyond the window of every block after the edited one gets no
    gradient at all, and Adam turns the rounding noise of a zero gradient into full steps, differently
    on the two paths."""
    tok, world = tok_world
    cases = _ragged(world.edit_cases(8, seed=4), ["", " and"])
    deltas = {}
    for reuse in (True, False):
        model = tiny(model_type, tok)
        editor = make_editor(
            method, LoadedModel(WORLD, model, tok, world), overrides=CHEAP[method], progress=False
        )
        editor.reuse = reuse
        deltas[reuse] = editor.edit(cases).deltas
    for name, ref in deltas[False].items():
        assert (deltas[True][name] - ref).norm() <= 1e-4 * ref.norm(), name


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _gemma3_wrapper(tok):
    """A tiny Gemma 3 image-text model (``Gemma3ForConditionalGeneration``, model type ``gemma3``)."""
    from transformers import Gemma3Config

    text = tiny_config("gemma3_text", tok).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = Gemma3Config(
        text_config=text,
        vision_config=dict(vision, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
        image_token_index=3,
    )
    return random_model(cfg)


def test_gemma3_image_text_folder_loads_as_its_text_model(tok_world, tmp_path):
    tok, world = tok_world
    wrapper = _gemma3_wrapper(tok)
    assert wrapper.config.model_type == "gemma3"
    lm = load_model(_save(wrapper, tok, tmp_path / "g3"), progress=False)
    assert lm.model.config.model_type == "gemma3_text" and arch_of(lm.model) is ARCHS["gemma3_text"]
    enc = tok(["The home town of Beirour Vonmun", "x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(lm.model(**enc).logits, wrapper(**enc).logits, atol=1e-5)
    before = copy.deepcopy(lm.model)
    editor = make_editor(
        "alphaedit", LoadedModel(WORLD, lm.model, lm.tok, world), overrides=CHEAP["alphaedit"], progress=False
    )
    _check_deltas(before, lm.model, editor.edit(world.edit_cases(4, seed=3)).deltas)


def test_a_wrapper_around_an_unknown_text_model_is_one_clear_error():
    """An image-text model whose text part is not in the table (LLaVA around Falcon): one error naming
    both model types, before any weight is used."""
    from transformers import LlavaConfig

    wrapper = torch.nn.Module()
    wrapper.config = LlavaConfig(text_config={"model_type": "falcon"})
    with pytest.raises(ModelError, match="'llava' wraps a 'falcon' text model"):
        text_only(wrapper)


def _shard_params(where: str):
    out = []
    for model_type in [*ARCH_TYPES, "gemma3"]:
        for method in ("memit", "alphaedit", "ultraedit", "mose"):
            slow = ON_SHARDS.get(model_type) != method or (where == "actors" and model_type != "gemma2")
            out.append(pytest.param(model_type, method, marks=[pytest.mark.slow] if slow else []))
    return out


def _shards_against_in_process(tok, world, folder: str, backbone, method: str) -> None:
    local = load_model(folder, progress=False).model
    cases = world.edit_cases(6, seed=5)
    over = CHEAP[method]
    remote = make_editor(
        method, LoadedModel(WORLD, backbone, tok, world), overrides=over, progress=False
    ).edit(cases)
    here = make_editor(method, LoadedModel(WORLD, local, tok, world), overrides=over, progress=False).edit(
        cases
    )
    assert set(remote.deltas) == set(here.deltas)
    for name, d in here.deltas.items():
        assert d.abs().sum() > 0 and torch.allclose(d, remote.deltas[name], atol=1e-4), name
    layer = int(next(iter(here.deltas)).split(".")[2])  # <decoder>.<layers>.<l>.mlp...
    assert torch.allclose(backbone.edit_weight(layer), LocalBackbone(local).edit_weight(layer), atol=1e-5)


def _folder(tok, tmp_path, model_type: str) -> str:
    model = _gemma3_wrapper(tok) if model_type == "gemma3" else tiny(model_type, tok)
    return _save(model, tok, tmp_path / model_type)


@pytest.mark.parametrize(("model_type", "method"), _shard_params("objects"))
def test_two_shards_edit_like_the_in_process_model(tok_world, tmp_path, model_type, method):
    """Two shards as plain objects (what each Ray actor wraps), each loading the folder itself with
    ``load_model(folder)`` and keeping its half of the blocks."""
    from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers

    tok, world = tok_world
    folder = _folder(tok, tmp_path, model_type)
    backbone = ShardedBackbone([ModelShard(folder, r) for r in split_layers(4, 2)])
    _shards_against_in_process(tok, world, folder, backbone, method)


@pytest.mark.parametrize(("model_type", "method"), _shard_params("actors"))
def test_two_shard_actors_edit_like_the_in_process_model(
    ray_session, tok_world, tmp_path, model_type, method
):
    """The same through two Ray actors (start_shards): Gemma 2 by default (each pair of actors takes
    tens of seconds to start on 2 busy cores), every other pair under -m slow."""
    from lme_sim.runtime.ray_utils import release, start_shards
    from lme_sim.sizing import split_layers

    tok, world = tok_world
    folder = _folder(tok, tmp_path, model_type)
    backbone = start_shards(folder, split_layers(4, 2))
    try:
        _shards_against_in_process(tok, world, folder, backbone, method)
    finally:
        release(backbone.shards, backbone.placement_group)


@pytest.mark.parametrize(
    ("model_type", "module"),
    [
        ("llama", "gate_proj"),
        ("llama", "up_proj"),
        ("llama", "down_proj"),
        ("gpt2", "up_proj"),
        ("gpt2", "down_proj"),
    ],
)
def test_the_taps_of_a_module_give_its_weight_gradient(tok_world, model_type, module):
    """Input-side keys k and output gradients g of any editable matrix of the last block, read at the
    positions whose logits the loss reads: sum_t g_t k_t^T is the gradient of the loss w.r.t. that
    matrix (in the last block a matrix changes nothing at other positions; GPT-2 has no gate, its
    up_proj is c_fc)."""
    from lme_sim.arch import edit_module_path, weight_view

    tok, world = tok_world
    model = tiny(model_type, tok)
    cases = world.edit_cases(4, seed=6)
    batch = encode_pairs(tok, [c.prompt for c in cases], [f"{c.target_new} {c.target_true}" for c in cases])
    rows, pos, labels = batch.target_positions()
    at = Positions(rows, pos)
    bb = LocalBackbone(model)
    keys, grads, _ = bb.keys_and_output_grads(batch.input_ids, batch.attention_mask, at, labels, [3], module)
    for l in (3,):
        W = weight_view(model, l, module)  # (out, in)
        assert keys[l].shape == (len(rows), W.shape[1]) and grads[l].shape == (len(rows), W.shape[0])
        param = model.get_submodule(edit_module_path(model, l, module)).weight  # GPT-2: (in, out)
        param.requires_grad_(True)
        logits = logits_at(model, batch.input_ids, batch.attention_mask, Positions(rows, pos))
        (dW,) = torch.autograd.grad(
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), [param]
        )
        param.requires_grad_(False)
        dW = dW.T if arch_of(model).transposed else dW
        assert torch.allclose(grads[l].T @ keys[l], dW, atol=1e-5), l


@pytest.mark.parametrize("module", ["gate_proj", "up_proj"])
def test_ultraedit_edits_gate_and_up_proj_on_shards_like_in_process(tok_world, tmp_path, module):
    """UltraEdit's published Llama-3 matrices: the taps (keys, gradients) and the deltas on 2 shards equal
    the in-process ones, and only that matrix changes."""
    from lme_sim.editors.edit_signals import answer_keys_and_grads
    from lme_sim.runtime.shards import ModelShard, ShardedBackbone, split_layers

    tok, world = tok_world
    folder = _folder(tok, tmp_path, "llama")
    local = load_model(folder, progress=False).model
    backbone = ShardedBackbone([ModelShard(folder, r) for r in split_layers(4, 2)])
    cases = world.edit_cases(6, seed=7)
    batch = encode_pairs(tok, [c.prompt for c in cases], [c.target_new for c in cases])
    here = answer_keys_and_grads(local, batch, [1, 2], 4, module)
    there = answer_keys_and_grads(backbone, batch, [1, 2], 4, module)
    for l in (1, 2):  # layer 1 on the first shard, layer 2 on the second: gradients cross shards
        assert torch.allclose(here.keys[l], there.keys[l], atol=1e-6)
        assert here.grads[l].abs().sum() > 0 and torch.allclose(here.grads[l], there.grads[l], atol=1e-7)
    before = copy.deepcopy(local)
    over = {"layers": [1, 2], "module": module}
    remote = make_editor(
        "ultraedit", LoadedModel(folder, backbone, tok), overrides=over, progress=False
    ).edit(cases)
    result = make_editor("ultraedit", LoadedModel(folder, local, tok), overrides=over, progress=False).edit(
        cases
    )
    assert sorted(result.deltas) == [f"model.layers.{l}.mlp.{module}.weight" for l in (1, 2)]
    _check_deltas(before, local, result.deltas)
    for name, d in result.deltas.items():
        assert d.shape == (128, 64) and torch.allclose(d, remote.deltas[name], atol=1e-5), name
    assert torch.allclose(
        backbone.edit_weight(2, module), LocalBackbone(local).edit_weight(2, module), atol=1e-6
    )


def test_a_module_the_architecture_lacks_is_one_clear_error(tok_world):
    from lme_sim.editors.hparams import HParamsError, load_hparams

    tok, world = tok_world
    # GPT-2 has no gate; Phi-3's gate and up are one fused matrix: the editor refuses before any work
    for model_type, has in (("gpt2", "['down_proj', 'up_proj']"), ("phi3", "['down_proj']")):
        msg = "editor.hparams.module: module 'gate_proj': not an editable matrix of this architecture"
        msg += f" (it has: {has})"
        with pytest.raises(HParamsError) as err:
            make_editor(
                "ultraedit",
                LoadedModel(WORLD, tiny(model_type, tok), tok, world),
                overrides={"module": "gate_proj"},
            )
        assert str(err.value) == msg
    with pytest.raises(HParamsError, match="module"):
        load_hparams("ultraedit", WORLD, {"module": "o_proj"})


def test_the_delta_guard_keeps_and_restores_the_edited_module(tok_world, tmp_path):
    """The editor service (what the runtime's editor actor wraps) on 2 shards: its weight statistics name
    the edited up_proj, and a rejected batch puts up_proj back bit for bit."""
    from lme_sim.runtime.services import Edited, EditorService, Rejected
    from lme_sim.runtime.shards import ModelShard, split_layers
    from lme_sim.scenario import EditorSpec

    tok, world = tok_world
    folder = _folder(tok, tmp_path, "llama")
    hp = {"layers": [1, 2], "module": "up_proj"}
    shards = [ModelShard(folder, r) for r in split_layers(4, 2)]
    service = EditorService(folder, shards, EditorSpec(method="ultraedit", hparams=hp))
    out = service.edit(world.edit_cases(4, seed=8))
    assert isinstance(out, Edited)
    assert [w["module"] for w in out.weight_stats] == [f"model.layers.{l}.mlp.up_proj.weight" for l in (1, 2)]
    assert all(w["cum_delta_norm"] > 0 for w in out.weight_stats)
    strict = EditorService(folder, shards, EditorSpec(method="ultraedit", hparams=hp, max_delta_norm=1e-9))
    before = {l: strict.backbone.edit_weight(l, "up_proj") for l in (1, 2)}
    assert isinstance(strict.edit(world.edit_cases(4, seed=9)), Rejected)
    for l in (1, 2):
        assert torch.equal(strict.backbone.edit_weight(l, "up_proj"), before[l])
