"""Editor hyperparameters: validated models, defaults per model in YAML shipped with the package.

``hparams/<method>.yaml`` holds a ``default`` section and one section per model family
(``world`` for every ``world:*`` model, else the model name as given in the registry).
A scenario's overrides go on top; an unknown or ill-typed field is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import field_path

HPARAMS_DIR = Path(__file__).parent / "hparams"


class HParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(min_length=1)
    batch_size: int = 64  # rows per forward pass (memory bound, not an editing choice)


class StatsHParams(BaseModel):
    """Where the second moment C0 = E[k k^T] of preserved keys comes from."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "world"  # world | file | hub | cases
    path: str | None = None  # file: one text per line (.txt) or a JSON list of strings
    # cases: a named CounterFact dataset (lme_sim.catalog) whose true facts make the corpus (lme_sim.corpus)
    source: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    n_samples: int = 100_000  # texts
    max_length: int = 128  # tokens per text


class TargetHParams(HParams):
    """Target-vector optimization (ROME/MEMIT compute_z), shared by MEMIT and AlphaEdit."""

    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_loss_stop: float = 5e-2
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    kl_prompt: str = "{} is a"
    context_templates: list[tuple[int, int]] = [(10, 5)]  # (length, count) of generated prefixes
    stats: StatsHParams = StatsHParams()


class HParamsError(ValueError):
    pass


def model_family(model_name: str) -> str:
    return "world" if model_name.startswith("world:") else model_name


def load_hparams(
    method: str, model_name: str, overrides: dict[str, Any] | None = None, where: str = "editor.hparams"
) -> HParams:
    """Defaults for ``method`` on ``model_name`` (its ``hparams/<method>.yaml``), with ``overrides`` on
    top, validated by the method's ``hparams_class``."""
    from .registry import editor_class  # the registry's lazy import

    try:
        cls = editor_class(method)
    except KeyError as e:
        raise HParamsError(e.args[0]) from None
    table = yaml.safe_load(cls.hparams_file().read_text()) or {}
    merged = _merge(table.get("default", {}), table.get(model_family(model_name), {}))
    merged = _merge(merged, overrides or {})
    if "layers" not in merged:
        raise HParamsError(
            f"{where}.layers: no default for model {model_name!r} with method {method!r}; "
            f"set the layers to edit (known models: {sorted(k for k in table if k != 'default')})"
        )
    try:
        return cls.hparams_class.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        raise HParamsError(f"{where}.{field_path(err['loc'])}: {err['msg']}") from None


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
