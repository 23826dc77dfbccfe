"""The editor registry: every module in this package that defines an :class:`~.base.Editor` registers
it with :func:`register`, and :func:`editor_class` discovers the modules on first use (none is listed
by hand). Adding a method is one file here plus its ``hparams/<method>.yaml``.

Discovery imports the method modules by name at run time (``importlib``), so the registry takes part
in no import loop: the method modules import ``register`` from here, and nothing here imports them.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Editor

EDITORS: dict[str, type[Editor]] = {}
_discovered = False


def register(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make ``cls`` available as ``editor.method: <cls.method>`` (tests may register
    their own editors too)."""
    EDITORS[cls.method] = cls
    return cls


def discover() -> None:
    """Import every module of this package once, so that each editor has registered itself."""
    global _discovered
    if _discovered:
        return
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{mod.name}")
    _discovered = True


def known_methods() -> list[str]:
    discover()
    return sorted(EDITORS)


def editor_class(method: str) -> type[Editor]:
    discover()
    if method not in EDITORS:
        raise KeyError(f"unknown editing method {method!r}; known: {', '.join(sorted(EDITORS))}")
    return EDITORS[method]
