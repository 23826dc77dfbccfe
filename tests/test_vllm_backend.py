"""HF vs vLLM evaluator backends on a small Llama-architecture model, before and after edits.

The tests marked ``vllm`` run with ``make test-vllm`` (its own venv with the CPU build of vLLM);
skipped where vLLM is not installed (``make test`` deselects them by marker). The worker-side
weight writer needs no vLLM: its test runs in ``make test``."""

import copy

import pytest
import torch

from lme_sim.backbone import LocalBackbone, add_deltas
from lme_sim.editors import make_editor
from lme_sim.metrics import case_metrics, summarize
from lme_sim.models import LoadedModel
from lme_sim.scenario import EditorSpec, EvaluatorSpec
from lme_sim.scoring import greedy_generate, score_targets
from lme_sim.vllm_scorer import VLLMOptions, VLLMScorer, _writer
from lme_sim.world import World, get_world_config
from lme_sim.world_model import TrainConfig, train_world_model

vllm = pytest.mark.vllm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_engine_writer_keeps_16_bit_weights_with_the_shards(dtype):
    """50 small deltas written into a 16-bit engine parameter in place (what ``VLLMScorer.apply_deltas``
    runs on each vLLM worker) end where the shards' weights end (``add_deltas`` with a float32
    master copy), not where 50 roundings of 16-bit sums drift to."""
    torch.manual_seed(0)
    engine, shard = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        shard.weight.copy_(engine.weight)
    engine, shard = engine.to(dtype), shard.to(dtype)
    exact, master = engine.weight.detach().double().clone(), {}
    for _ in range(50):
        d = 1e-4 * torch.randn(32, 64)  # well below a 16-bit step of weights of ~0.1
        _writer({"weight": d}, {})(engine)
        add_deltas(shard, {"weight": d}, master)
        exact += d.double()
    step = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)  # the dtype's resolution
    assert ((shard.weight.double() - exact).abs() <= step).all()  # the shards follow the exact sum
    drift = (engine.weight.double() - shard.weight.double()).abs()
    assert (drift <= step).all(), f"engine drifted {drift.max().item():.2e} from the shards"


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    pytest.importorskip("vllm")
    """A 2-layer Llama (head_dim 64) trained on the small world, saved where vLLM can load it."""
    world = World(get_world_config("small"))
    model, tok, stats = train_world_model(
        world, TrainConfig(arch="llama", n_layer=2, n_head=2), progress=False
    )
    print("tiny Llama on the small world:", stats)
    path = tmp_path_factory.mktemp("llama-world")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval(), tok, world, str(path)


@pytest.fixture(scope="module")
def engine(llama_world):
    return VLLMScorer(
        llama_world[3], VLLMOptions(dtype="float32", max_model_len=32, gpu_memory_utilization=0.25)
    )


def _probes(cases):
    prompts, targets = [], []
    for c in cases:
        for p in (c.prompt, *c.paraphrases):
            prompts += [p, p]
            targets += [c.target_new, c.target_true]
        for p, answer in c.neighborhood:
            prompts += [p, p]
            targets += [answer, c.target_new]
    return prompts, targets


def _assert_same(hf, engine, tok, cases):
    prompts, targets = _probes(cases)
    a = score_targets(LocalBackbone(hf), tok, prompts, targets)
    b = score_targets(engine, tok, prompts, targets)
    gap = (a.mean_logprob - b.mean_logprob).abs().max().item()
    print(f"{len(prompts)} probes: max |log P_hf - log P_vllm| = {gap:.2e}")
    assert gap < 1e-3
    assert torch.equal(a.token_acc, b.token_acc)
    m_hf, m_vllm = (
        summarize(case_metrics(LocalBackbone(hf), tok, cases)),
        summarize(case_metrics(engine, tok, cases)),
    )
    assert m_hf == pytest.approx(m_vllm, abs=1e-9)
    return m_hf


@vllm
def test_same_greedy_generations(llama_world, engine):
    """(Runs before the engine is edited by the next test.)"""
    model, tok, world, _ = llama_world
    prompts = [c.prompt for c in world.edit_cases(6, seed=5)]
    assert greedy_generate(engine, tok, prompts, max_new_tokens=5) == greedy_generate(
        LocalBackbone(model), tok, prompts, max_new_tokens=5
    )


@vllm
def test_same_logprobs_and_metrics_before_and_after_edits(llama_world, engine):
    model, tok, world, _ = llama_world
    model = copy.deepcopy(model)
    cases = world.edit_cases(20, seed=2)
    before = _assert_same(model, engine, tok, cases)
    editor = make_editor(
        "memit", LoadedModel("world:small", model, tok, world), overrides={"layers": [0, 1]}, progress=False
    )
    for i in (0, 10):
        result = editor.edit(cases[i : i + 10])
        version = engine.apply_deltas(result.deltas)  # only the changed tensors travel
    after = _assert_same(model, engine, tok, cases)
    print("before", before, "after", after)
    assert version == 2 and after["efficacy"] >= before["efficacy"] + 0.5  # the edits really took, in both


@vllm
def test_evaluator_service_with_the_vllm_backend(llama_world):
    from lme_sim.runtime.services import EvalRequest, Evaluator, RetentionItem

    model, tok, world, path = llama_world
    cases = world.edit_cases(5, seed=7)
    ev = Evaluator(
        path, EvaluatorSpec(backend="vllm", dtype="float32", max_model_len=32, gpu_memory_utilization=0.45)
    )
    retention = [RetentionItem(i, c.prompt, c.target_true, []) for i, c in enumerate(cases)]
    fluency = [c.prompt for c in cases[:2]]
    out = ev.evaluate(
        EvalRequest(eval_id=1, retention=retention, cases=cases, n_edits=len(cases), fluency_prompts=fluency)
    )
    names = {r.name for r in out.metrics}
    assert {"efficacy", "specificity", "retention", "fluency"} <= names and len(out.probes) == 5
    assert (
        ev.load({}, 3) == 3
        and ev.evaluate(
            EvalRequest(eval_id=2, retention=retention, cases=cases, n_edits=5, fluency_prompts=fluency),
            version=3,
        ).version
        == 3
    )


@vllm
def test_a_vllm_evaluator_actor_scores_a_smollm2_run_as_the_hf_one():
    """The runtime's pieces on SmolLM2-135M: 2 shard actors, an editor actor (FT on a few CounterFact
    edits; the shards follow its deltas), and two evaluator actors, one on the vLLM backend and one
    on HF, following the same versioned deltas: every probe and metric agrees, before and after."""
    pytest.importorskip("vllm")
    import os

    from lme_sim.data import load_counterfact
    from lme_sim.runtime.ray_utils import init_ray, start_shards
    from lme_sim.runtime.services import Edited, EditorService, EvalRequest, Evaluator, RetentionItem
    from lme_sim.sizing import split_layers

    from .conftest import shared_file

    cases = load_counterfact(shared_file("counterfact-edit.json"), limit=4)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the engine's RAM stays small
    ray = init_ray(object_store_mb=256)
    try:
        shards = start_shards("smollm2-135m", split_layers(30, 2))
        editor = (
            ray.remote(EditorService)
            .options(num_cpus=0)
            .remote(
                "smollm2-135m",
                shards.shards,
                EditorSpec(method="ft", hparams={"lr": 0.002, "norm_constraint": 0.002, "num_steps": 15}),
            )
        )
        engine = {"dtype": "float32", "max_model_len": 128}
        actor = ray.remote(Evaluator).options(num_cpus=0)
        evaluators = [
            actor.remote("smollm2-135m", EvaluatorSpec(backend=backend, **(options or {})), rows_per_pass=16)
            for backend, options in (("vllm", engine), ("hf", None))
        ]
        retention = [RetentionItem(i, c.prompt, c.target_new, [c.target_true]) for i, c in enumerate(cases)]
        fluency = [c.prompt for c in cases[:2]]
        totals = []
        for version, batch in enumerate((None, cases[:2], cases[2:])):
            if batch is not None:
                out = ray.get(editor.edit.remote(batch))
                assert isinstance(out, Edited), out
                assert ray.get([e.follow.remote(out.deltas, version) for e in evaluators]) == [version] * 2
            req = EvalRequest(
                eval_id=version, retention=retention, cases=cases, n_edits=len(cases), fluency_prompts=fluency
            )
            v, h = ray.get([e.evaluate.remote(req, version=version) for e in evaluators])
            assert len(v.probes) == len(h.probes) == 4
            gap = max(abs(a.logprob - b.logprob) for a, b in zip(v.probes, h.probes))
            mv, mh = ({m.name: m.value for m in r.metrics} for r in (v, h))
            print(
                f"version {version}: max |log P_vllm - log P_hf| over the retention probes = {gap:.2e}; "
                f"vLLM {mv}; HF {mh}"
            )
            assert gap < 1e-3
            assert [(p.correct, p.token_acc, p.batch_id) for p in v.probes] == [
                (p.correct, p.token_acc, p.batch_id) for p in h.probes
            ]
            assert mv.keys() == mh.keys() >= {"efficacy", "specificity", "retention", "fluency"}
            assert mv == pytest.approx(mh, abs=1e-6)
            totals.append(sum(p.logprob for p in h.probes))
        assert totals[2] > totals[0] + 0.1  # the edits moved the new targets' log-probs (in both evaluators)
    finally:
        ray.shutdown()


@vllm
def test_generative_probes_give_the_same_strings_on_smollm2():
    """The generative metrics' continuations (every probe prompt of 8 CounterFact cases, greedy, the
    evaluation's token budget) are the same strings from vLLM's engine and from the HF model, before
    and after an edit whose deltas both receive."""
    pytest.importorskip("vllm")
    import os

    from lme_sim.data import load_counterfact
    from lme_sim.metrics import generation_budget, generation_probes
    from lme_sim.models import load_model, model_path

    from .conftest import shared_file

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cases = load_counterfact(shared_file("counterfact-edit.json"), limit=8)
    lm = load_model("smollm2-135m", progress=False)
    engine = VLLMScorer(model_path("smollm2-135m"), VLLMOptions(dtype="float32", max_model_len=128))
    prompts, expected, _ = generation_probes(cases)
    n = generation_budget(lm.tok, expected)
    before = greedy_generate(LocalBackbone(lm.model), lm.tok, prompts, n)
    assert greedy_generate(engine, lm.tok, prompts, n) == before
    editor = make_editor(
        "ft",
        LoadedModel("smollm2-135m", lm.model, lm.tok),
        overrides={"lr": 0.002, "norm_constraint": 0.002, "num_steps": 15},
    )
    engine.apply_deltas(editor.edit(cases[:4]).deltas)
    after = greedy_generate(LocalBackbone(lm.model), lm.tok, prompts, n)
    assert greedy_generate(engine, lm.tok, prompts, n) == after
    changed = sum(a != b for a, b in zip(before, after))
    print(f"{len(prompts)} probe prompts x {max(n)} tokens at most: the same strings; {changed} changed")
    assert changed > 0  # the edit reached both
