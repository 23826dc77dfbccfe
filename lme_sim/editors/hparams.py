"""Editor hyperparameters: validated models, defaults per model in YAML shipped with the package.

``hparams/<method>.yaml`` holds a ``default`` section and one section per model family
(``world`` for every ``world:*`` model, else the model name as given in the registry).
A scenario's overrides go on top; an unknown or ill-typed field is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class MEMITHParams(TargetHParams):
    mom2_update_weight: float = 15000.0  # lambda in  Delta = R K^T (lambda C0 + K K^T)^-1


class AlphaEditHParams(TargetHParams):
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the null space
    L2: float = 10.0


class FTHParams(HParams):
    """Constrained fine-tuning of W (Zhu et al. 2020, as the FT-L baseline in ROME)."""

    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 5e-4  # |W - W0|_inf after every step
    loss_stop: float = 1e-2


class MOSEHParams(HParams):
    """Multiplicative orthogonal editing (arXiv 2601.07873): a block-diagonal Cayley rotation of W's input."""

    n_blocks: int = Field(4, gt=0)  # diagonal blocks of Q (d_ff must be divisible by it)
    optimizer: Literal["adam", "sgd"] = "adam"  # on the rotation parameters (published: Adam)
    lr: float = 5e-4
    num_steps: int = Field(25, gt=0)
    loss_stop: float = 0.0  # stop a batch's fit once the mean NLL is below this (0: never, as published)
    coft_eps: float | None = 1e-5  # published constraint ||theta_b|| <= eps b^2 / sqrt(n_blocks); null: off


class RLEditHParams(HParams):
    """A trained hypernetwork editor (RLEdit arXiv 2502.05759 on MALMEN's network); ``layers`` are the
    candidate modules. Fields below ``checkpoint`` shape and train the networks (``lme-sim train-editor``)."""

    checkpoint: str | None = None  # trained networks; null: for world:* models, train on first use and cache
    rank: int = Field(64, gt=0)  # of the low-rank residual blocks
    n_blocks: int = Field(2, gt=0)
    init_lr: float = Field(1.0, gt=0)  # step size eta per module at the start of training
    init_lambda: float = Field(1.0, gt=0)  # ridge term lambda per module at the start of training
    train_lr: float = Field(1e-3, gt=0)  # Adam on the networks
    rollouts: int = Field(300, gt=0)  # sequences of edit batches (one optimizer step each)
    rollout_batches: int = Field(10, gt=0)  # batches per sequence
    edits_per_batch: int = Field(10, gt=0)
    lookback: int = Field(3, ge=0)  # reward counts the paraphrases of the last `lookback` earlier batches too
    mu: float = Field(0.5, ge=0)  # ... weighted mu^i for the batch i steps back
    locality: float = Field(1.0, ge=0)  # weight of KL(before || after) on unrelated prompts
    locality_prompts: int = Field(32, gt=0)
    holdout: int = Field(2000, ge=0)  # dataset files: the first `holdout` records are left for evaluation
    seed: int = 0


class HiEditHParams(RLEditHParams):
    """RLEdit plus a router that picks ``top_k`` of the candidate modules per edit (arXiv 2604.11214)."""

    top_k: int | None = Field(None, gt=0)  # default: half of the candidates
    explore: bool = True  # training draws each edit's subset (Gumbel top-k) instead of taking the best
    balance: float = Field(0.0, ge=0)  # weight of a penalty on uneven module usage while training
    router_phase_lr: float = Field(1e-3, gt=0)  # Adam after the RLEdit start (train_lr trains that start)
    router_locality: float = Field(0.0, ge=0)  # router reward: weight of the KL on each edit's neighborhood prompts


class UltraEditHParams(HParams):
    """UltraEdit (arXiv 2505.14679): lifelong-normalized pseudo-values and a ridge solve per batch.
    ``batch_size``: rows per forward/backward pass (rows sorted by length, see edit_signals)."""

    lr: float = Field(1e-3, gt=0)  # v = -lr ||k^||^2 g^
    ridge: float = Field(1.0, gt=0)  # lambda in (K^T K + lambda I)^-1 K^T V (published: 1)


HPARAM_CLASSES: dict[str, type[HParams]] = {
    "ultraedit": UltraEditHParams,
    "rledit": RLEditHParams,
    "hiedit": HiEditHParams,
    "memit": MEMITHParams,
    "alphaedit": AlphaEditHParams,
    "ft": FTHParams,
    "mose": MOSEHParams,
}


class HParamsError(ValueError):
    pass


def model_family(model_name: str) -> str:
    return "world" if model_name.startswith("world:") else model_name


def load_hparams(method: str, model_name: str, overrides: dict[str, Any] | None = None,
                 where: str = "editor.hparams") -> HParams:
    """Defaults for ``method`` on ``model_name``, with ``overrides`` on top, validated."""
    if method not in HPARAM_CLASSES:
        raise HParamsError(f"unknown editing method {method!r}; known: {sorted(HPARAM_CLASSES)}")
    table = yaml.safe_load((HPARAMS_DIR / f"{method}.yaml").read_text()) or {}
    merged = _merge(table.get("default", {}), table.get(model_family(model_name), {}))
    merged = _merge(merged, overrides or {})
    if "layers" not in merged:
        raise HParamsError(
            f"{where}.layers: no default for model {model_name!r} with method {method!r}; "
            f"set the layers to edit (known models: {sorted(k for k in table if k != 'default')})"
        )
    try:
        return HPARAM_CLASSES[method].model_validate(merged)
    except ValidationError as e:
        from ..scenario import field_path

        err = e.errors()[0]
        raise HParamsError(f"{where}.{field_path(err['loc'])}: {err['msg']}") from None


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
