"""Editing methods behind one interface (:class:`~lme_sim.editors.base.Editor`), found by the registry
(:mod:`lme_sim.editors.registry`)."""

from .base import Editor, EditResult, make_editor
from .registry import EDITORS, editor_class, known_methods, register

__all__ = ["EDITORS", "EditResult", "Editor", "editor_class", "known_methods", "make_editor", "register"]
