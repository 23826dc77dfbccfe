"""What scenario files and editor hyperparameters share: strict pydantic models and one way to name
the field an error is about."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section whose unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def field_path(loc) -> str:
    """``editor.0.method`` from a pydantic error location; a key that is not a plain name is quoted
    (``stream.'\\r'``), so a message stays one readable line."""
    return ".".join(
        p if isinstance(p, str) and p.isidentifier() else str(p) if isinstance(p, int) else repr(p)
        for p in loc
    )


def merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mappings merged key by key (how hparam overrides apply)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
