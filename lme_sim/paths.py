"""Where lme-sim keeps caches (trained worlds, converted models, key statistics)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """``$LME_SIM_CACHE`` or ``~/.cache/lme_sim``."""
    env = os.environ.get("LME_SIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lme_sim"


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder that becomes ``final`` only if the block finishes.

    A killed or failing build never leaves a half-written cache entry behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # someone else finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
