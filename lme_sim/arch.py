"""One table mapping model architectures to the modules that editing touches.

W (the *edit module*) is by default the MLP output projection (``down_proj``): its input is the key k
(size d_ff), its output is added to the residual stream. An editor may edit another MLP matrix
(its ``module`` hyperparameter, where the method supports it): ``gate_proj`` or ``up_proj``, whose input
is the block's normalized hidden state (size d_model) and output size d_ff. The names are Llama's;
:attr:`ArchSpec.modules` maps them to each architecture's own (GPT-2's ``c_fc`` is its ``up_proj``; it
has no gate). GPT-2 stores its matrices as ``Conv1D`` weights, (in, out); every other architecture uses
``nn.Linear`` with weight (out, in). All editing math here works on W in (out, in) orientation
((d_model, d_ff) for ``down_proj``); :func:`weight_view` hides the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_MODULE = "down_proj"


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path to the ModuleList of decoder blocks
    edit_module: str  # path of the default W (the MLP output projection) inside one block
    final_norm: str
    embed: str
    transposed: bool = False  # True where weights are stored (in, out) (GPT-2 Conv1D)
    # other editable MLP matrices: Llama's name -> path inside one block
    other_modules: tuple[tuple[str, str], ...] = ()

    @property
    def modules(self) -> dict[str, str]:
        """Every editable matrix: Llama's name (``down_proj``, ``gate_proj``, ``up_proj``) -> its path."""
        return {DEFAULT_MODULE: self.edit_module, **dict(self.other_modules)}


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        "transformer.h",
        "mlp.c_proj",
        "transformer.ln_f",
        "transformer.wte",
        transposed=True,
        other_modules=(("up_proj", "mlp.c_fc"),),
    ),
    "gptj": ArchSpec(
        "transformer.h",
        "mlp.fc_out",
        "transformer.ln_f",
        "transformer.wte",
        other_modules=(("up_proj", "mlp.fc_in"),),
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        "gpt_neox.final_layer_norm",
        "gpt_neox.embed_in",
        other_modules=(("up_proj", "mlp.dense_h_to_4h"),),
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
_GATED = (("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"))
for _llama_like in _LLAMA_LIKE:
    ARCHS[_llama_like] = ArchSpec(
        "model.layers",
        "mlp.down_proj",
        "model.norm",
        "model.embed_tokens",
        # Phi-3 fuses gate and up into one gate_up_proj: only its down_proj is editable
        other_modules=() if _llama_like == "phi3" else _GATED,
    )


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


def module_in_block(spec: ArchSpec, module: str = DEFAULT_MODULE) -> str:
    """The path of ``module`` (``down_proj``, ``gate_proj``, ``up_proj``) inside one block of ``spec``;
    a ValueError naming the modules the architecture has where it lacks this one."""
    if module not in spec.modules:
        raise ValueError(
            f"module {module!r}: not an editable matrix of this architecture (it has: {sorted(spec.modules)})"
        )
    return spec.modules[module]


def edit_module_path(model: nn.Module, layer: int, module: str = DEFAULT_MODULE) -> str:
    return f"{layer_path(model, layer)}.{module_in_block(arch_of(model), module)}"


def weight_view(model: nn.Module, layer: int, module: str = DEFAULT_MODULE) -> torch.Tensor:
    """W (``module`` of block ``layer``) as an (out, in) tensor, (d_model, d_ff) for ``down_proj``
    (a view: no copy)."""
    w = get_module(model, edit_module_path(model, layer, module)).weight
    return w.T if arch_of(model).transposed else w
