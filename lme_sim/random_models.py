"""Randomly initialised models of every architecture in :data:`lme_sim.arch.ARCHS`, built from
transformers' config classes (nothing downloaded): tiny ones for the architecture tests, and real
models' shapes (:data:`SHAPES`: Llama-3-8B for the GPU check, benchmarks/gpu_check.py; Llama-3.2-1B
for the 1B-scale runtime benchmark, benchmarks/scale_1b.py), saved as a local folder where the
runtime's actors load them by path (:func:`save_random_model`).

The tiny configs are 4 blocks of width 64 (d_ff 128: MOSE's 4 rotation blocks divide it), with the
features that change how a block runs switched on where the architecture has them: grouped-query
attention, GPT-J's partial rotary embedding and parallel block, GPT-NeoX's partial rotary embedding
and parallel residual, and sliding windows of 4 tokens (shorter than the test prompts, so a mask
that ignored them would give different results) on Mistral and Phi-3 (every layer), Qwen2 (the
upper half) and Gemma 2/3 (alternate layers, with Gemma 2's attention and final soft caps).
"""

from __future__ import annotations

import torch

TINY_LAYERS = 4
_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=256)
_GQA = dict(_WIDTH, num_key_value_heads=2)
_ALTERNATING = ["sliding_attention", "full_attention"] * (TINY_LAYERS // 2)

# model_type -> keyword arguments of its config class (besides vocab_size and the layer count)
TINY: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_inner=128, n_head=4, n_positions=256),
    "gptj": dict(n_embd=64, n_inner=128, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_neox": dict(_WIDTH, rotary_pct=0.5, use_parallel_residual=True),
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=4),
    "qwen2": dict(_GQA, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(_GQA, head_dim=16),
    "gemma": dict(_GQA, head_dim=16),
    "gemma2": dict(_GQA, head_dim=16, sliding_window=4, layer_types=_ALTERNATING),
    "gemma3_text": dict(_GQA, head_dim=16, sliding_window=4, layer_types=_ALTERNATING),
    "olmo": _WIDTH,
    "olmo2": _GQA,
    "phi3": dict(_GQA, sliding_window=4),
}


def tiny_config(model_type: str, tok, n_layers: int = TINY_LAYERS, **overrides):
    """The config of a tiny random ``model_type`` model (:data:`TINY`) for tokenizer ``tok`` (its
    vocabulary size and special tokens)."""
    from transformers import CONFIG_MAPPING

    if model_type not in TINY:
        raise ValueError(f"no tiny config for model type {model_type!r}; known: {sorted(TINY)}")
    layer_key = "n_layer" if model_type in ("gpt2", "gptj") else "num_hidden_layers"
    special = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    kwargs = {**TINY[model_type], layer_key: n_layers, "vocab_size": len(tok), **special, **overrides}
    return CONFIG_MAPPING[model_type](**kwargs)


LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
# Llama-3.2-1B (about 1.24B parameters; tied input and output embeddings). Its published config also
# scales RoPE for long contexts (rope_type llama3, factor 32); at the benchmarks' prompt lengths the
# scaling changes no cost, so it is left out.
LLAMA32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# name -> LlamaConfig keyword arguments of a real model's shape
SHAPES: dict[str, dict] = {"llama3-8b": LLAMA3_8B, "llama3.2-1b": LLAMA32_1B}


def shape_config(shape: str, vocab_size: int | None = None):
    """The LlamaConfig of a named real model's shape (:data:`SHAPES`), optionally with a smaller
    vocabulary."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"no shape {shape!r}; known: {sorted(SHAPES)}")
    return LlamaConfig(**{**SHAPES[shape], **({"vocab_size": vocab_size} if vocab_size else {})})


def llama3_8b_config(vocab_size: int | None = None):
    """Llama-3-8B's shape (about 8.0B parameters), optionally with a smaller vocabulary."""
    return shape_config("llama3-8b", vocab_size)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A causal LM of ``config`` with random weights (seeded), in eval mode, built on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_random_model(config, folder, tok, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """A random model of ``config`` (its special tokens set from ``tok``) saved with ``tok`` into
    ``folder``, so that every actor loads it by path, as it would a downloaded model. The model is
    built and written in this process and dropped before returning (a 1.24B model in float32 holds
    5 GB here while it is written)."""
    import gc

    for t in ("bos", "eos", "pad"):
        setattr(config, f"{t}_token_id", getattr(tok, f"{t}_token_id"))
    model = random_model(config, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    gc.collect()
