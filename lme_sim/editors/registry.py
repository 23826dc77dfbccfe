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
    their own editors too). A name another class has taken is an error, never a silent replacement."""
    taken = EDITORS.get(cls.method)
    if taken is not None and _where(taken) != _where(cls):  # the same class again: a re-import
        raise ValueError(
            f"editing method {cls.method!r} is already registered by {_where(taken)}; "
            f"{_where(cls)} needs another name"
        )
    EDITORS[cls.method] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
        raise KeyError(f"unknown editing method {unknown_method(method)}")
    return EDITORS[method]


def unknown_method(method: str) -> str:
    """``'<method>' (did you mean '<close name>'? known: ...)``: how an unknown method is named in
    errors, with the registered names closest to it."""
    import difflib

    known = known_methods()
    close = difflib.get_close_matches(method, known, n=2, cutoff=0.6)
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{method!r} ({guess}known: {', '.join(known)})"
