"""Editor hyperparameters: validated models, defaults per model in YAML shipped with the package.

``hparams/<method>.yaml`` holds a ``default`` section and one section per model family
(``world`` for every ``world:*`` model, else the model name as given in the registry).
A scenario's overrides go on top; an unknown or ill-typed field is an error naming it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import field_path, merged

HPARAMS_DIR = Path(__file__).parent / "hparams"


class HParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(min_length=1)
    rows_per_pass: int = 64  # rows per forward pass (memory bound, not an editing choice)


# hyperparameters renamed: the old name is still read, with a deprecation message (old -> new)
RENAMED = {"batch_size": "rows_per_pass"}  # stream.batch_size is the edits per batch


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


class NormAnchorHParams(BaseModel):
    """Norm-Anchor Scaling's settings (published defaults; :mod:`.norm_anchor`)."""

    model_config = ConfigDict(extra="forbid")

    # requests the reference norm is taken over: a CounterFact or ZsRE JSON file, or a named dataset
    # (source, as `lme-sim data list` shows); neither: the embedded world's edit cases (world:* models)
    path: str | None = None
    source: str | None = None
    n_samples: int = Field(1000, gt=0)  # published nas_restart: 1000
    upper_quantile: float = Field(0.95, gt=0, le=1)  # norms above this quantile leave the mean
    skip_factor: float = Field(2.0, gt=0)  # a v* above skip_factor x the reference is not written
    seed: int = 0  # which requests are sampled (published: 0)


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
    # Norm-Anchor Scaling (NAS, arXiv 2602.02543; editors/norm_anchor.py): null: off
    norm_anchor: NormAnchorHParams | None = None


class HParamsError(ValueError):
    pass


def model_family(model_name: str) -> str:
    """The section of an hparams YAML that ``model_name`` reads (its kind's ``hparams_key``)."""
    from ..models import model_kind

    return model_kind(model_name).hparams_key(model_name)


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
    file = cls.hparams_file()
    table = yaml.safe_load(file.read_text()) or {}
    values = merged(
        _renamed(table.get("default", {}), f"{file}: default"),
        _renamed(table.get(model_family(model_name), {}), f"{file}: {model_family(model_name)}"),
    )
    values = merged(values, _renamed(overrides or {}, where))
    if "layers" not in values:
        raise HParamsError(
            f"{where}.layers: no default for model {model_name!r} with method {method!r}; "
            f"set the layers to edit (known models: {sorted(k for k in table if k != 'default')})"
        )
    try:
        return cls.hparams_class.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields: its message starts with the field it names
            raise HParamsError(f"{where}.{err['msg'].removeprefix('Value error, ')}") from None
        raise HParamsError(f"{where}.{field_path(err['loc'])}: {err['msg']}") from None


def _renamed(section: dict, where: str) -> dict:
    """``section`` with the old names of :data:`RENAMED` replaced by the new ones (a FutureWarning
    says so); both names at once is an error."""
    out = dict(section)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise HParamsError(f"{where}.{old}: the old name of {new}; give only {new}")
        warnings.warn(
            f"{where}.{old} is deprecated: it is now {where}.{new} (rows per forward pass)",
            FutureWarning,
            stacklevel=3,
        )
        out[new] = out.pop(old)
    return out
