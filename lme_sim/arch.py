"""One table mapping model architectures to the modules that editing touches.

W (the *edit module*) is the MLP output projection: its input is the key k (size d_ff), its
output is added to the residual stream. GPT-2 stores it as a ``Conv1D`` whose weight is
(d_ff, d_model); every other architecture uses ``nn.Linear`` with weight (d_model, d_ff).
All editing math here works on W in (d_model, d_ff) orientation; :func:`weight_view` hides
the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path to the ModuleList of decoder blocks
    edit_module: str  # path of W inside one block
    final_norm: str
    embed: str
    transposed: bool = False  # True where W is stored (d_ff, d_model) (GPT-2 Conv1D)


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "transformer.wte", transposed=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "transformer.wte"),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "gpt_neox.embed_in"
    ),
}
_LLAMA_LIKE = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",  # Gemma 3's text models (Gemma3ForCausalLM)
    "olmo",
    "olmo2",
    "phi3",
)
for _llama_like in _LLAMA_LIKE:
    ARCHS[_llama_like] = ArchSpec("model.layers", "mlp.down_proj", "model.norm", "model.embed_tokens")


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"model type {model_type!r} is not in the architecture table; known: {sorted(ARCHS)}"
        )
    return ARCHS[model_type]


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that holds the blocks (and the rotary or position embeddings): ``model.model``,
    ``model.transformer``, ..."""
    return model.get_submodule(arch_of(model).layers.rsplit(".", 1)[0])


def logits_of(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) from final hidden states ``h`` (after the final norm), as the model's
    own forward computes them: the output head, then the final soft cap where the config sets one
    (Gemma 2: ``cap * tanh(logits / cap)``)."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def layers_of(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)


def n_layers(model: nn.Module) -> int:
    return len(layers_of(model))


def layer_path(model: nn.Module, layer: int) -> str:
    return f"{arch_of(model).layers}.{layer}"


def edit_module_path(model: nn.Module, layer: int) -> str:
    return f"{layer_path(model, layer)}.{arch_of(model).edit_module}"


def weight_view(model: nn.Module, layer: int) -> torch.Tensor:
    """W of ``layer`` as a (d_model, d_ff) tensor (a view: no copy)."""
    w = get_module(model, edit_module_path(model, layer)).weight
    return w.T if arch_of(model).transposed else w
