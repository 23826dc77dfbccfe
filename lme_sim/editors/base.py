"""The editor interface: a batch of EditCases in, weight deltas (already applied) out."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..arch import DEFAULT_MODULE
from ..backbone import Backbone, as_backbone
from ..cases import EditCase
from ..models import LoadedModel
from .hparams import HPARAMS_DIR, HParams, load_hparams
from .registry import editor_class

# The phases an edit's time is split into (EditResult.timings; the batches table; ``lme-sim bench``):
#   keys     reading W's inputs: MEMIT/AlphaEdit keys (and AlphaEdit's keys for its covariance after
#            the batch), RLEdit/HiEdit per-token keys and output gradients
#   targets  target-vector optimization (MEMIT, AlphaEdit)
#   solve    computing the update: MEMIT/AlphaEdit's linear solve, MOSE's rotation fit and FT's weight
#            fit (gradient steps straight on the weights, no target vectors), RLEdit/HiEdit's
#            hypernetwork and ridge solve
#   apply    adding the deltas to the editor's model (on shards: sending them to the owning actor)
#   sync     bringing other copies up to date: shards following an in-process editor, evaluator replicas
# The runtime adds its own to a batch's timings (the batches table): the editor service
# (lme_sim.runtime.services)
#   guard    the copies of the edited matrices a rejected batch is restored from (the delta guard)
#   health   the weight health of every edited matrix after the batch (lme_sim.weights.matrix_stats)
# and the coordinator: eval_wait (for room in the evaluation queue), pace_wait (the stream's clock).
PHASES = ("keys", "targets", "solve", "apply", "sync")


@dataclass
class EditResult:
    deltas: dict[str, torch.Tensor]  # parameter name -> delta, shaped like the parameter
    timings: dict[str, float] = field(default_factory=dict)  # phase (one of PHASES) -> seconds
    stats: dict[str, float] = field(default_factory=dict)
    touched: list[list[str]] | None = None  # per edit, the parameters it changed (None: all of ``deltas``)


class PhaseTimer(dict):
    """``with timer("keys"): ...`` adds the block's seconds to ``timer["keys"]``."""

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


class Editor(ABC):
    method: ClassVar[str]
    hparams_class: ClassVar[type[HParams]] = HParams  # validates hparams/<method>.yaml and overrides
    in_process: ClassVar[bool] = False  # needs the model in this process (not shards): FT, RLEdit, HiEdit
    trained: ClassVar[bool] = False  # edits with networks trained by `lme-sim train-editor` (RLEdit, HiEdit)

    def __init__(self, lm: LoadedModel, hparams: HParams, *, progress: bool = True, device: str = "cpu"):
        """``lm``: the model to edit, its tokenizer, name and world; its ``model`` a
        :class:`~lme_sim.backbone.Backbone` (e.g. shards) or a Hugging Face model. ``device``: where
        the editor's own tensors and solves live (the model's weights stay where the backbone holds
        them)."""
        self.model = as_backbone(lm.model)
        self.tok, self.world, self.model_name = lm.tok, lm.world, lm.name
        self.lm = replace(lm, model=self.model)  # the same, through the backbone
        self.hp, self.progress, self.device = hparams, progress, device

    @abstractmethod
    def edit(self, cases: list[EditCase]) -> EditResult:
        """Write ``cases`` into the model's weights; return the deltas that were added.

        Two-phase: state the batch computes (AlphaEdit's key covariance, MOSE's rotation) is pending
        until :meth:`commit`; the runtime commits once the delta guard accepts the batch, or calls
        :meth:`discard`. A stateful editor commits what is still pending at the start of its next
        ``edit`` and in ``state_dict``, so a plain loop of ``edit`` calls needs no ``commit``."""

    def commit(self) -> None:
        """Adopt the state the last :meth:`edit` computed (the delta guard accepted its batch)."""

    def discard(self) -> None:
        """Forget the state the last :meth:`edit` computed (its batch was rejected and its weights put
        back): the editor is as if the batch never came, with no copy of its state ever made."""

    @classmethod
    def check_hparams(cls, model_name: str, hp: HParams, where: str) -> None:
        """Checks before a run that need more than the hyperparameters' own types (e.g. a checkpoint
        file); raise :class:`~.hparams.HParamsError` ``"<where>.<field>: ..."``."""

    @classmethod
    def hparams_file(cls) -> Path:
        """The method's defaults: a ``default`` section and one per model family."""
        return HPARAMS_DIR / f"{cls.method}.yaml"

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a restart (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def apply_layer_delta(
    backbone: Backbone, layer: int, delta: torch.Tensor, module: str = DEFAULT_MODULE
) -> tuple[str, torch.Tensor]:
    """W += delta for W the ``module`` of block ``layer``, delta (out, in) ((d_model, d_ff) for
    ``down_proj``); returns (parameter name, delta in the parameter's layout)."""
    name = backbone.edit_param_name(layer, module)
    stored = delta.T.contiguous() if backbone.transposed() else delta
    backbone.apply_deltas({name: stored})
    return name, stored


def make_editor(
    method: str, lm: LoadedModel, *, overrides: dict | None = None, progress: bool = True, device: str = "cpu"
) -> Editor:
    """An editor of ``method`` for ``lm`` (:func:`lme_sim.models.load_model`'s, or the same with a
    backbone in its ``model``), with the shipped defaults for ``lm.name`` and ``overrides`` on top."""
    return editor_class(method)(
        lm, load_hparams(method, lm.name, overrides), progress=progress, device=device
    )
