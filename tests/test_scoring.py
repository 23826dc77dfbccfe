import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lme_sim.metrics import n_gram_entropy, retention
from lme_sim.scoring import greedy_generate, score_targets


def _one_at_a_time(model, tok, prompts, targets):
    return torch.cat([score_targets(model, tok, [p], [t]).mean_logprob for p, t in zip(prompts, targets)])


def test_batched_scoring_equals_one_at_a_time_on_world(small_world):
    model, tok, world = small_world
    cases = world.edit_cases(24, seed=1)
    prompts = [c.prompt for c in cases] + [c.paraphrases[-1] for c in cases]
    targets = [c.target_true for c in cases] + [c.target_new for c in cases]
    batched = score_targets(model, tok, prompts, targets, batch_size=7)
    assert torch.allclose(batched.mean_logprob, _one_at_a_time(model, tok, prompts, targets), atol=1e-4)
    # the model knows its facts: the true objects are the argmax
    assert batched.token_acc[:24].mean() > 0.9


def test_batched_scoring_multi_token_targets_with_rotary_model(small_world):
    """Llama architecture (rotary positions), targets of several tokens, very uneven lengths."""
    _, tok, world = small_world
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    prompts = ["The job of " + s for s in world.subjects[:6]] + ["The"]
    targets = ["is a", world.objects[world.relations[0]][0], "and of the", ". ,", "a", "I You The", "is"]
    batched = score_targets(model, tok, prompts, targets, batch_size=4)
    assert torch.allclose(batched.mean_logprob, _one_at_a_time(model, tok, prompts, targets), atol=1e-4)
    assert batched.n_tokens.tolist() == [2, 1, 3, 2, 1, 3, 1]
    assert torch.allclose(batched.sum_logprob, batched.mean_logprob * batched.n_tokens, atol=1e-6)


def _llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def test_scoring_by_prompt_equals_one_row_per_pair(small_world):
    """Targets that share a prompt continue from its attention cache: the same log-probs and token
    accuracies as a row per pair, on GPT-2 (the world) and Llama (rotary) blocks, for shared and
    distinct prompts, repeated pairs, and targets of one to three tokens."""
    from lme_sim.backbone import LocalBackbone
    from lme_sim.scoring import score_by_prompt, score_each
    from lme_sim.tokens import encode_pairs

    world_model, tok, world = small_world
    cases = world.edit_cases(12, seed=3)
    prompts, targets = [], []
    for c in cases:
        prompts += [c.prompt, c.prompt, c.paraphrases[-1], c.prompt]
        targets += [c.target_new, c.target_true, c.target_new, c.target_new]  # the last one repeats
    prompts += ["The job of " + world.subjects[0]] * 3 + ["The"]
    targets += ["is a", "and of the", world.objects[world.relations[0]][0], "I You The"]
    batch = encode_pairs(tok, prompts, targets)
    assert sorted(set(batch.target_len.tolist())) == [1, 2, 3]
    for model in (world_model, _llama(tok)):
        ref = score_each(LocalBackbone(model), batch, batch_size=5)
        got = score_by_prompt(model, batch, batch_size=3)
        assert torch.allclose(got.mean_logprob, ref.mean_logprob, atol=1e-4)
        assert torch.equal(got.token_acc, ref.token_acc)
        assert torch.equal(got.n_tokens, ref.n_tokens)
        # score_targets takes this path for an in-process model
        assert torch.allclose(
            score_targets(model, tok, prompts, targets).mean_logprob, ref.mean_logprob, atol=1e-4
        )
    assert ref.mean_logprob.std() > 0.1  # real, differing scores


def test_greedy_generation_batched_equals_single(small_world):
    model, tok, world = small_world
    prompts = [c.prompt for c in world.edit_cases(5, seed=2)]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=3, batch_size=5)
    single = [greedy_generate(model, tok, [p], max_new_tokens=3)[0] for p in prompts]
    assert batched == single
    first = [g.split()[0] for g in batched]
    truth = {f"{world.templates(f.relation)[0].format(f.subject)}": f.obj for f in world.facts}
    assert sum(first[i] == truth[p] for i, p in enumerate(prompts)) >= 4


def test_n_gram_entropy_values():
    assert n_gram_entropy("a a a a a a") == 0.0
    # 4 distinct bigrams (2 bits) and 3 distinct trigrams (log2 3 bits)
    text = "a b c d e"
    expected = ((2 / 3) * 2.0 + (4 / 3) * math.log2(3)) / 2
    assert abs(n_gram_entropy(text) - expected) < 1e-9


def test_retention_latest_value_must_win(small_world):
    model, tok, world = small_world
    f = world.facts[0]
    prompt = world.prompt(f)
    other = next(o for o in world.objects[f.relation] if o != f.obj)
    r = retention(model, tok, [prompt, prompt, prompt], [f.obj, other, f.obj], [[other], [f.obj], []])
    assert r.tolist() == [1.0, 0.0, 1.0]


def test_generation_with_kv_cache_equals_the_reference_path(small_world):
    """Left-padded cached generation = the no-cache path (right padding, whole sequence every step),
    for uneven prompt lengths, greedy and sampled, through an nn.Module and a LocalBackbone."""
    from lme_sim.backbone import LocalBackbone
    from lme_sim.scoring import generate

    model, tok, world = small_world
    prompts = [c.prompt for c in world.edit_cases(6, seed=3)] + ["The", world.subjects[0]]
    assert len({len(q) for q in tok(prompts)["input_ids"]}) > 1
    for m in (model, LocalBackbone(model)):
        ref = greedy_generate(m, tok, prompts, max_new_tokens=6, batch_size=3, cache=False)
        assert greedy_generate(m, tok, prompts, max_new_tokens=6, batch_size=3) == ref
        assert greedy_generate(m, tok, prompts, max_new_tokens=6, batch_size=8, cache=True) == ref
    sampled = [
        generate(
            model,
            tok,
            prompts,
            max_new_tokens=5,
            batch_size=4,
            top_k=5,
            generator=torch.Generator().manual_seed(1),
            cache=c,
        )
        for c in (False, True)
    ]
    assert sampled[0] == sampled[1]
    limit = model.config.n_positions  # both stop where the longest row reaches the position limit
    long = [" ".join(["The"] * (limit - 3)), "The"]
    assert greedy_generate(model, tok, long, 10, cache=True) == greedy_generate(
        model, tok, long, 10, cache=False
    )
    assert greedy_generate(model, tok, [], 4) == []


def test_history_metrics_over_all_or_a_sample_of_the_edits(small_world):
    from lme_sim.metrics import case_metrics, history_metrics, summarize

    model, tok, world = small_world
    cases = world.edit_cases(12, seed=4)
    full = history_metrics(model, tok, cases)
    assert full == {**summarize(case_metrics(model, tok, cases)), "efficacy_n": 12.0}
    part = history_metrics(model, tok, cases, sample=5, seed=7)
    assert part["efficacy_n"] == 5.0 and part == history_metrics(model, tok, cases, sample=5, seed=7)
