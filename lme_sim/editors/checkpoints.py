"""Checkpoints of the learned editors' networks (RLEdit, HiEdit): saved with the base model's
fingerprint, refused for any other model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..arch import arch_of


class CheckpointMismatch(ValueError):
    pass


def model_fingerprint(model) -> str:
    """A short hash of the model's configuration and its (never edited) token embeddings."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(
        json.dumps(
            {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)},
            sort_keys=True,
            default=str,
        ).encode()
    )
    emb = model.get_input_embeddings().weight.detach().float().flatten()[: 1 << 16].cpu()
    h.update(emb.numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(path, method: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no editor checkpoint here; make one with "
            f"`lme-sim train-editor --method {method} --model <model> --out {path}`"
        )
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    if ckpt.get("method") != method:
        raise CheckpointMismatch(f"{path}: a {ckpt.get('method')!r} checkpoint, not {method!r}")
    return ckpt


def check_model(ckpt: dict, model, path) -> None:
    fp = model_fingerprint(model)
    if ckpt["fingerprint"] != fp or ckpt["arch"] != arch_of(model).layers + "/" + arch_of(model).edit_module:
        raise CheckpointMismatch(
            f"{path}: this {ckpt['method']} checkpoint was trained for model {ckpt['model']!r} "
            f"(fingerprint {ckpt['fingerprint']}), not for this model (fingerprint {fp}); "
            f"train one for it with `lme-sim train-editor --method {ckpt['method']} --model <model>`"
        )


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.rename(path)
    return path
