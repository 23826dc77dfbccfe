"""Editing methods behind one interface (:class:`~lme_sim.editors.base.Editor`)."""

from .base import EDITORS, EditResult, Editor, apply_deltas, editor_class, make_editor

__all__ = ["EDITORS", "EditResult", "Editor", "apply_deltas", "editor_class", "make_editor"]
