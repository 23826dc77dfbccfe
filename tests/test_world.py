import datetime as dt

from lme_sim.world import World, WorldConfig, get_world_config
from lme_sim.world_model import _fact_batch, fact_accuracy


def test_world_is_deterministic_and_seeded():
    a, b = World(get_world_config("small")), World(get_world_config("small"))
    assert a.facts == b.facts and a.changes == b.changes
    c = World(WorldConfig(name="other", seed=7, n_subjects=80, n_relations=3, n_objects=16, n_first_names=12))
    assert [f.obj for f in c.facts] != [f.obj for f in a.facts]


def test_world_structure():
    w = World(get_world_config("small"))
    cfg = w.config
    assert len(w.facts) == cfg.n_subjects * cfg.n_relations
    assert len(set(w.subjects)) == cfg.n_subjects
    vocab = set(w.vocabulary)
    for prompt, obj in w.sentences():
        assert set(prompt.split()) <= vocab and obj in vocab
    for rel in w.relations:
        assert len(w.templates(rel)) >= 3  # rewrite prompt + paraphrases


def test_dated_histories_change_two_to_four_times_in_order():
    w = World(get_world_config("small"))
    by_fact = {}
    for ch in w.changes:
        by_fact.setdefault(ch.fact.fact_id, []).append(ch)
    assert len(by_fact) == w.config.n_histories
    start = dt.date.fromisoformat(w.config.start_date)
    for chain in by_fact.values():
        assert 2 <= len(chain) <= 4
        assert chain[0].old == chain[0].fact.obj
        for prev, nxt in zip(chain, chain[1:]):
            assert prev.date < nxt.date and nxt.old == prev.new and nxt.new != nxt.old
        assert all(start < c.date for c in chain)


def test_edit_cases_have_probes():
    w = World(get_world_config("small"))
    cases = w.edit_cases(50, seed=3)
    assert len({c.meta["fact_id"] for c in cases}) == 50
    for c in cases:
        assert c.target_new != c.target_true and c.target_new in w.objects[c.relation]
        assert c.paraphrases and c.neighborhood
        assert all(c.subject not in p for p, _ in c.neighborhood)
        assert all(ans != c.target_new for _, ans in c.neighborhood)


def test_small_world_model_knows_its_facts(small_world):
    model, tok, world = small_world
    ids, pos, obj = _fact_batch(world, tok)
    assert fact_accuracy(model, ids, pos, obj) >= 0.95
    # every object is one token, and the tokenizer prepends BOS like Llama's
    enc = tok("The job of " + world.subjects[0])
    assert enc["input_ids"][0] == tok.bos_token_id
    assert all(
        len(tok(" " + o, add_special_tokens=False)["input_ids"]) == 1
        for o in world.objects[world.relations[0]]
    )
