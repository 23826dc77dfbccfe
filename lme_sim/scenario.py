"""Scenario files: what to edit, with which method, how to stream it and how to evaluate.

Validated with pydantic; any error is a :class:`ScenarioError` naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    kind: Literal["world", "counterfact", "zsre"] = "world"
    path: str | None = None  # counterfact / zsre: a local JSON file or a datasets hub id
    n_edits: int = Field(100, gt=0)
    seed: int = 0
    zsre_target: Literal["answers", "alt"] = "answers"


class EditorSpec(_Strict):
    method: Literal["memit", "alphaedit", "ft"] = "alphaedit"
    hparams: dict[str, Any] = {}


class StreamSpec(_Strict):
    batch_size: int = Field(10, gt=0)


class EvalSpec(_Strict):
    every: int = Field(1, gt=0)  # evaluate after every N batches (and after the last)
    batch_size: int = Field(64, gt=0)  # probes per forward pass
    fluency_prompts: int = Field(32, ge=0)  # prompts whose greedy generations measure fluency (0: off)


class Scenario(_Strict):
    name: str
    model: str = "world:default"
    data: DataSpec = DataSpec()
    editor: EditorSpec = EditorSpec()
    stream: StreamSpec = StreamSpec()
    eval: EvalSpec = EvalSpec()
    output_dir: str = "runs"


class ScenarioError(ValueError):
    pass


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of fields, got {type(raw).__name__}")
    try:
        scn = Scenario(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ScenarioError(f"{path}: field '{field}': {err['msg']}") from None
    if scn.data.kind != "world" and not scn.data.path:
        raise ScenarioError(f"{path}: field 'data.path': required for data.kind {scn.data.kind!r}")
    if scn.data.kind == "world" and not scn.model.startswith("world:"):
        raise ScenarioError(f"{path}: field 'data.kind': 'world' data needs a world:* model, not {scn.model!r}")
    from .editors.hparams import HParamsError, load_hparams

    try:
        load_hparams(scn.editor.method, scn.model, scn.editor.hparams)
    except HParamsError as e:
        raise ScenarioError(f"{path}: field {e}") from None
    return scn
