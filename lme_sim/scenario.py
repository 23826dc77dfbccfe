"""Scenario files: what to edit, with which method, how to stream it and how to evaluate.

Validated with pydantic; any error is a :class:`ScenarioError` naming the file and the field.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .runtime.delta_guard import DEFAULT_MAX_DELTA_NORM
from .stream import Timeline


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    kind: Literal["world", "counterfact", "zsre"] = "world"
    path: str | None = None  # counterfact / zsre: a local JSON file or a datasets hub id
    n_edits: int = Field(100, gt=0)
    seed: int = 0
    zsre_target: Literal["answers", "alt"] = "answers"


class EditorSpec(_Strict):
    method: Literal["memit", "alphaedit", "mose", "rledit", "hiedit", "ft", "ultraedit"] = "alphaedit"
    hparams: dict[str, Any] = {}
    # a batch whose delta of some matrix has ||delta|| > max_delta_norm * ||W|| (or NaN/Inf) is rejected
    max_delta_norm: float = Field(DEFAULT_MAX_DELTA_NORM, gt=0)


class StreamSpec(_Strict):
    batch_size: int = Field(10, gt=0)  # edits per editor batch
    # arrival pattern; default: fixed batches covering data.n_edits, evaluated every eval.every batches
    timeline: Timeline | None = None
    speedup: float | None = Field(None, gt=0)  # simulated seconds per wall second; None: as fast as possible
    start: str = "2024-01-01"  # simulated date (and time) of the first event, ISO 8601

    @field_validator("start", mode="before")
    @classmethod
    def _iso_start(cls, v):
        if isinstance(v, dt.date):  # YAML reads an unquoted 2024-01-01 as a date
            return v.isoformat()
        if isinstance(v, str):
            try:
                dt.datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an ISO date or time, e.g. 2024-01-01 or 2024-01-01T09:00") from None
        return v


class RuntimeSpec(_Strict):
    shards: int = Field(1, gt=0)  # contiguous layer ranges, one Ray actor each
    evaluators: int = Field(1, gt=0)
    # GPUs per shard and per evaluator: true (one each), a share such as 0.3 (several on one GPU), or
    # false (CPU; shards ask for an emulated resource instead)
    gpus: float = Field(0, ge=0, le=1)
    # how the shards' placement group spreads over nodes (STRICT_SPREAD: one shard per node)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # shards load their layers in it


class EvaluatorSpec(_Strict):
    """Which engine scores the probes: Hugging Face (any machine) or vLLM (GPU; a CPU build exists)."""

    backend: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = Field(1, gt=0)  # vllm: GPUs per evaluator
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # vllm
    dtype: str = "auto"  # vllm: auto | float32 | bfloat16 | float16
    max_model_len: int | None = Field(None, gt=0)  # vllm: longest prompt + generation


class GeneralAbilitySpec(_Strict):
    """Multiple-choice probes of what the model knows beyond the edits (:mod:`lme_sim.general_ability`)."""

    n: int = Field(64, ge=0)  # items scored per evaluation (0: off)
    # JSON(L) of {question, choices, answer}; default: unedited world facts (world:*) or the built-in set
    path: str | None = None


class EvalSpec(_Strict):
    every: int = Field(1, gt=0)  # evaluate after every N batches (and after the last)
    retention_sample: int = Field(500, gt=0)  # at most this many earlier edits probed per eval
    fluency_prompts: int = Field(16, ge=0)  # recent prompts whose greedy generations measure fluency
    batch_size: int = Field(64, gt=0)  # probes per forward pass
    general_ability: GeneralAbilitySpec = GeneralAbilitySpec()


class Scenario(_Strict):
    name: str
    model: str = "world:default"
    data: DataSpec = DataSpec()
    # one editing method, or a list of them: each runs the same stream as its own run
    editor: EditorSpec | list[EditorSpec] = EditorSpec()
    stream: StreamSpec = StreamSpec()
    eval: EvalSpec = EvalSpec()
    evaluator: EvaluatorSpec = EvaluatorSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    output_dir: str = "runs"
    db: str = "runs/lme.duckdb"

    @property
    def editors(self) -> list[EditorSpec]:
        return self.editor if isinstance(self.editor, list) else [self.editor]

    def with_editor(self, spec: EditorSpec) -> "Scenario":
        """This scenario with one editing method (how a list of methods is run, one run each)."""
        return self.model_copy(update={"editor": spec})

    def timeline(self) -> Timeline:
        if self.stream.timeline is not None:
            return self.stream.timeline
        bs = self.stream.batch_size
        return Timeline(pattern="fixed", n_batches=-(-self.data.n_edits // bs), batch_size=bs,
                        eval_every=self.eval.every * bs)


class ScenarioError(ValueError):
    """One line: the file, the field and what is wrong with it."""


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ScenarioError(f"{path}: not valid YAML: {where}{what}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of fields, got {type(raw).__name__}")
    try:
        scn = Scenario.model_validate(raw)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the most specific (a union tries each branch)
        field = field_path(p for p in err["loc"] if not _is_type_tag(p))
        raise ScenarioError(f"{path}: field '{field}': {err['msg']}") from None
    if scn.data.kind != "world" and not scn.data.path:
        raise ScenarioError(f"{path}: field 'data.path': required for data.kind {scn.data.kind!r}")
    if scn.data.kind == "world" and not scn.model.startswith("world:"):
        raise ScenarioError(f"{path}: field 'data.kind': 'world' data needs a world:* model, not {scn.model!r}")
    if scn.model.startswith("world:"):
        from .world import WORLDS

        if scn.model.split(":", 1)[1] not in WORLDS:
            raise ScenarioError(f"{path}: field 'model': unknown world {scn.model!r} (known: "
                                f"{', '.join('world:' + w for w in WORLDS)})")
        _check_world_edits(path, scn)
    n_layers = model_n_layers(scn.model)
    if n_layers is None:
        raise ScenarioError(f"{path}: field 'model': {scn.model!r} is not a registered model (world:<name>, "
                            "smollm2-135m), a local model folder, or a hub id reachable from here")
    if scn.runtime.shards > n_layers:
        raise ScenarioError(f"{path}: field 'runtime.shards': {scn.runtime.shards} shards for a model with "
                            f"{n_layers} layers (at most one shard per layer)")
    if scn.data.kind != "world" and scn.data.path and "/" in scn.data.path and not Path(scn.data.path).exists():
        raise ScenarioError(f"{path}: field 'data.path': file {scn.data.path!r} not found")
    if scn.eval.general_ability.path:
        from .general_ability import ProbeSetError, load_items

        try:
            load_items(scn.eval.general_ability.path)
        except ProbeSetError as e:
            raise ScenarioError(f"{path}: field 'eval.general_ability.path': {e}") from None
    from .editors.hparams import HParamsError, load_hparams

    if scn.evaluator.backend == "vllm":
        from .vllm_scorer import vllm_available

        if not vllm_available():
            raise ScenarioError(f"{path}: field 'evaluator.backend': vllm is not installed here; install it on "
                                "the GPU machines (README: vLLM evaluators), or set backend: hf")
    if not scn.editors:
        raise ScenarioError(f"{path}: field 'editor': an empty list; name at least one method")
    for i, spec in enumerate(scn.editors):
        where = f"editor.{i}.hparams" if isinstance(scn.editor, list) else "editor.hparams"
        try:
            hp = load_hparams(spec.method, scn.model, spec.hparams, where=where)
        except HParamsError as e:
            raise ScenarioError(f"{path}: field {e}") from None
        if missing := [l for l in hp.layers if not 0 <= l < n_layers]:
            raise ScenarioError(f"{path}: field '{where}.layers': no layer {missing[0]} in {scn.model!r} "
                                f"(layers 0..{n_layers - 1})")
        if spec.method in ("rledit", "hiedit"):
            _check_editor_checkpoint(path, f"{where}.checkpoint", spec.method, scn.model, spec.hparams.get("checkpoint"))
    return scn


def _check_editor_checkpoint(path: Path, field: str, method: str, model: str, ckpt: str | None) -> None:
    """A learned editor needs networks trained for this model (world models train their own)."""
    if ckpt is None:
        if not model.startswith("world:"):
            raise ScenarioError(f"{path}: field '{field}': {method} on {model!r} needs a checkpoint; make one with "
                                f"`lme-sim train-editor --method {method} --model {model} --data <file> --out <path>`")
        return
    if not Path(ckpt).is_file():
        raise ScenarioError(f"{path}: field '{field}': file {ckpt!r} not found")
    import torch

    try:
        meta = torch.load(ckpt, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (any file can be named here)
        raise ScenarioError(f"{path}: field '{field}': {ckpt!r} is not an editor checkpoint ({type(e).__name__})") \
            from None
    if not isinstance(meta, dict):
        raise ScenarioError(f"{path}: field '{field}': {ckpt!r} is not an editor checkpoint")
    if meta.get("method") != method or meta.get("model") != model:
        raise ScenarioError(f"{path}: field '{field}': {ckpt!r} is a {meta.get('method')!r} checkpoint for model "
                            f"{meta.get('model')!r}, not {method!r} for {model!r}")


def _check_world_edits(path: Path, scn: Scenario) -> None:
    """World data: no more edits than the world has facts (a history timeline replays its changes instead)."""
    if scn.data.kind != "world" or (scn.stream.timeline is not None and scn.stream.timeline.pattern == "history"):
        return
    from .world import World, get_world_config

    n_facts = len(World(get_world_config(scn.model.split(":", 1)[1])).facts)
    if scn.data.n_edits > n_facts:
        raise ScenarioError(f"{path}: field 'data.n_edits': {scn.data.n_edits} edits, but {scn.model!r} has "
                            f"{n_facts} facts (one edit per fact)")


def _is_type_tag(part) -> bool:
    """pydantic names the branch of a union in an error's location ('EditorSpec', 'list[EditorSpec]')."""
    return isinstance(part, str) and (part in {"EditorSpec", "Timeline"} or part.startswith("list["))


def field_path(loc) -> str:
    """``editor.0.method`` from an error location; a key that is not a plain name is quoted
    (``stream.'\\r'``), so a message stays one readable line."""
    return ".".join(p if isinstance(p, str) and p.isidentifier() else str(p) if isinstance(p, int) else repr(p)
                    for p in loc)


def model_n_layers(name: str) -> int | None:
    """Layer count from the model's config, without loading weights (None if unknown here)."""
    if name.startswith("world:"):
        from .world_model import TrainConfig

        return TrainConfig().n_layer
    if name == "smollm2-135m":
        return 30
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name)
    except Exception:
        return None
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
