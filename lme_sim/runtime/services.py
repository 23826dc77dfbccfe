"""The plain classes behind the runtime's Ray actors: the editor and the evaluator, and the typed
results they send back.

* :class:`EditorService` runs an editor over the shard actors. Per batch it returns :class:`Edited`
  (the deltas of the changed tensors, timings, and the weight health of every edited matrix), or
  :class:`Rejected` when the deltas fail the :mod:`~lme_sim.runtime.delta_guard`: then the weights
  written during the batch are put back and the editor drops the state the batch computed (editors
  are two-phase: ``edit`` computes, ``commit`` adopts), so nothing of the batch is kept anywhere.
* :class:`Evaluator` keeps its own replica of the model, follows the editor through versioned
  deltas (never a full model copy after start-up) and scores an :class:`EvalRequest` in batched
  passes into :class:`Evaluation` rows; every row records the batch_id of the model it scored
  (its version - 1: :func:`batch_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import DEFAULT_MODULE
from ..backbone import LocalBackbone
from ..cases import EditCase
from ..editors import editor_class, make_editor
from ..editors.base import PhaseTimer
from ..general_ability import MCItem, mc_accuracy
from ..metrics import case_probes, case_rows, fluency, generation_metrics, retained, summarize
from ..models import LoadedModel, load_model, load_tokenizer
from ..scenario import EditorSpec, EvaluatorSpec
from ..scoring import TargetScores, score_targets
from ..storage.records import MetricRecord, ProbeRecord
from ..sysinfo import process_memory
from .delta_guard import delta_problem
from .devices import placed_device
from .shards import ShardedBackbone


@dataclass
class Edited:
    """A batch written into the shards (and the editor's replica)."""

    deltas: dict[str, torch.Tensor]  # parameter name -> delta, only the changed tensors
    timings: dict[str, float]
    touched: list[list[str]] | None  # per edit, the parameters it changed (None: all of ``deltas``)
    weight_stats: list[dict]  # per edited matrix: module, norms, condition number (after the batch)


@dataclass
class Rejected:
    """A batch the delta guard refused: no model copy and no editor state kept anything of it."""

    reason: str
    timings: dict[str, float]


class EditorService:
    """Methods that work through shards edit them directly; methods that need the model in process
    (FT, RLEdit, HiEdit: ``Editor.in_process``) edit a local replica and the shards follow its deltas.
    ``device``: where the editor's own work runs (its solves, AlphaEdit's projectors); ``pipeline``:
    chunks of independent requests through the shards at once (:class:`~.shards.ShardedBackbone`)."""

    def __init__(
        self, model_name: str, shards: list, spec: EditorSpec, *, device: str = "cpu", pipeline: bool = True
    ):
        device = placed_device(device)  # "cuda": the GPU Ray gave this actor
        self.max_delta_norm = spec.max_delta_norm
        self.backbone = ShardedBackbone(shards, pipeline=pipeline)
        self.local = None
        if editor_class(spec.method).in_process:
            lm = load_model(model_name, device=device, progress=False)
            self.tok, self.world, self.local = lm.tok, lm.world, LocalBackbone(lm.model)
        else:
            self.tok, self.world = load_tokenizer(model_name)
        self.editor = make_editor(
            spec.method,
            LoadedModel(model_name, self.local or self.backbone, self.tok, self.world),
            overrides=spec.hparams,
            progress=False,
            device=device,
        )
        self.layers = list(self.editor.hp.layers)
        self.module = getattr(self.editor.hp, "module", DEFAULT_MODULE)  # the matrix edited in each layer
        self.weight_stats()  # records the unedited weights where they live

    def edit(self, cases: list[EditCase]) -> Edited | Rejected:
        written = self.local or self.backbone  # where the editor writes while it edits
        timer = PhaseTimer()
        with timer("guard"):  # the copies a rejected batch is restored from (the delta guard)
            norms = written.save_weights(self.layers, self.module)
        result = self.editor.edit(cases)
        timer.update(result.timings)
        problem = delta_problem(result.deltas, norms, self.max_delta_norm)
        if problem is not None:
            written.restore_weights()
            self.editor.discard()
            return Rejected(problem, dict(timer))
        self.editor.commit()
        if self.local is not None:
            with timer("sync"):  # the shards follow the local replica
                self.backbone.apply_deltas(result.deltas)
        with timer("health"):
            health = self.weight_stats()
        return Edited(result.deltas, dict(timer), result.touched, health)

    def weight_stats(self) -> list[dict]:
        """Norms and condition number of every edited matrix, and the norm of its accumulated delta."""
        return [
            {
                "module": self.backbone.edit_param_name(l, self.module),
                **self.backbone.weight_stats(l, self.module),
            }
            for l in self.layers
        ]

    def restore(self, cum: dict[str, torch.Tensor], state: dict) -> None:
        """Bring the shards (and a local replica) and the editor to a checkpoint (resume): the unedited
        weights plus ``cum``, the editor's ``state``."""
        self.backbone.apply_deltas(cum)
        if self.local is not None:
            self.local.apply_deltas(cum)
        self.editor.load_state_dict(state)

    def state_dict(self) -> dict:
        return self.editor.state_dict()

    def memory(self, reset_peak: bool = False) -> dict[str, float]:
        """This actor's resident memory and its high-water mark (:func:`lme_sim.sysinfo.process_memory`)."""
        return process_memory(reset_peak)


@dataclass
class RetentionItem:
    """Is a fact's latest value in force? ``earlier``: the values it replaced (may be empty)."""

    edit_id: int
    prompt: str
    value: str
    earlier: list[str]


def retention_pairs(items: list[RetentionItem]) -> tuple[list[str], list[str]]:
    """(prompt, value) pairs: each item's latest value, then each distinct earlier value."""
    prompts, targets = [], []
    for r in items:
        for value in [r.value] + [v for v in r.earlier if v != r.value]:
            prompts.append(r.prompt)
            targets.append(value)
    return prompts, targets


def version_after(batch_id: int) -> int:
    """The model version after batch ``batch_id``: the number of batches in force (0: unedited).
    Versions keep the evaluators' replicas in step with the editor; the database records only
    ``batch_id`` (:func:`batch_of`)."""
    return batch_id + 1


def batch_of(version: int) -> int:
    """The last batch in force in model ``version`` (-1: none), the inverse of :func:`version_after`."""
    return version - 1


@dataclass(kw_only=True)
class EvalRequest:
    eval_id: int
    retention: list[RetentionItem]  # a uniform sample of the facts edited so far (all of them: final)
    cases: list[EditCase]  # the papers' metrics are taken on these: a uniform sample of the edits so far
    n_edits: int  # edits committed so far (the sample is drawn from them)
    fluency_prompts: list[str] = field(default_factory=list)
    generative: bool = True  # also the generative metrics on ``cases`` (metrics.generation_metrics)


@dataclass
class Evaluation:
    eval_id: int
    version: int
    probes: list[ProbeRecord]
    metrics: list[MetricRecord]


@dataclass
class Behind:
    """The replica is at another version than the one an evaluation was for (a restarted actor)."""

    version: int


class Evaluator:
    """``spec.backend``: "hf" (an in-process replica on ``device`` in ``dtype``) or "vllm" (an engine
    with the spec's options). ``general_items``: the run's multiple-choice set; its accuracy on the
    unedited model is the reference for ``general_ability_retention``."""

    def __init__(
        self,
        model_name: str,
        spec: EvaluatorSpec | None = None,
        *,
        rows_per_pass: int = 64,
        general_items: list[MCItem] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        device = placed_device(device)  # "cuda": the GPU Ray gave this actor
        spec = spec or EvaluatorSpec()
        if spec.backend == "vllm":
            from ..models import model_path
            from ..vllm_scorer import VLLMOptions, VLLMScorer

            self.tok = load_tokenizer(model_name)[0]
            options = VLLMOptions(**spec.model_dump(exclude={"backend"}))
            self.backbone = VLLMScorer(model_path(model_name), options)
        else:
            lm = load_model(model_name, dtype=getattr(torch, dtype), device=device, progress=False)
            self.backbone, self.tok = LocalBackbone(lm.model), lm.tok
        self.rows_per_pass = rows_per_pass
        self.version = 0
        self.general_items = list(general_items or [])
        self.general_before = (
            mc_accuracy(self.backbone, self.tok, self.general_items, rows_per_pass)
            if self.general_items
            else None
        )
        self.cum: dict[str, torch.Tensor] = {}  # the sum of the deltas applied so far

    def memory(self, reset_peak: bool = False) -> dict[str, float]:
        """This actor's resident memory and its high-water mark (:func:`lme_sim.sysinfo.process_memory`)."""
        return process_memory(reset_peak)

    def follow(self, deltas: dict[str, torch.Tensor], version: int) -> int:
        """Take the replica from ``version - 1`` to ``version``: W += delta for the changed tensors.
        A replica at another version (a restarted actor is back at 0) leaves them: it stays behind
        until :meth:`load`, and its evaluations say so. Returns the replica's version."""
        if version != self.version + 1:
            return self.version
        self._add(deltas)
        self.version = version
        return version

    def load(self, cum: dict[str, torch.Tensor], version: int) -> int:
        """Bring the replica to an absolute state, whatever it held: the unedited weights plus
        ``cum``, the sum of every delta up to ``version`` (resume, re-sync after a restart)."""
        diff = {name: d - self.cum[name] if name in self.cum else d for name, d in cum.items()}
        diff.update({name: -d for name, d in self.cum.items() if name not in cum})
        self._add(diff)
        self.version = version
        return version

    def _add(self, deltas: dict[str, torch.Tensor]) -> None:
        self.backbone.apply_deltas(deltas)
        for name, d in deltas.items():
            self.cum[name] = self.cum[name] + d if name in self.cum else d.clone()

    @torch.no_grad()
    def evaluate(self, req: EvalRequest, version: int | None = None) -> Evaluation | Behind:
        """Retention probes (is each fact's latest value in force?) and the papers' metrics on
        ``req.cases``. ``version``: the model version this evaluation is for; a replica at another
        one scores nothing and answers :class:`Behind`."""
        if version is not None and version != self.version:
            return Behind(self.version)
        version, ev = self.version, req.eval_id
        # retention and the papers' metrics in one scoring call: pairs that share a prompt (a fact's
        # values, an edit's new and true object) share its pass (scoring.score_by_prompt)
        r_prompts, r_targets = retention_pairs(req.retention)
        c_prompts, c_targets, index = case_probes(req.cases)
        scores = score_targets(
            self.backbone, self.tok, r_prompts + c_prompts, r_targets + c_targets, self.rows_per_pass
        )
        probes = self._retention(req, scores[: len(r_prompts)])
        metrics: dict[str, tuple[float, int]] = {}
        if req.cases:
            rows = case_rows(req.cases, index, scores[len(r_prompts) :])
            if req.generative:  # greedy continuations of the same probes' prompts, one batched call
                gen = generation_metrics(self.backbone, self.tok, req.cases, self.rows_per_pass)[0]
                rows = [{**r, **g} for r, g in zip(rows, gen)]
            metrics.update({k: (v, sum(k in r for r in rows)) for k, v in summarize(rows).items()})
        if probes:
            metrics["retention"] = (sum(p.correct for p in probes) / len(probes), len(probes))
        if req.fluency_prompts:
            metrics["fluency"] = (
                fluency(self.backbone, self.tok, req.fluency_prompts),
                len(req.fluency_prompts),
            )
        if self.general_items:
            acc = mc_accuracy(self.backbone, self.tok, self.general_items, self.rows_per_pass)
            metrics["general_ability"] = (acc, len(self.general_items))
            if self.general_before:
                metrics["general_ability_retention"] = (acc / self.general_before, len(self.general_items))
        batch_id = batch_of(version)
        rows = [
            MetricRecord(eval_id=ev, batch_id=batch_id, name=name, value=float(v), n=n)
            for name, (v, n) in metrics.items()
        ]
        return Evaluation(ev, version, probes, rows)

    def _retention(self, req: EvalRequest, scores: TargetScores) -> list[ProbeRecord]:
        """Every item's latest value against each of its earlier values (``scores``: of
        :func:`retention_pairs`)."""
        items = req.retention
        out, k = [], 0
        for r in items:
            n = 1 + len([v for v in r.earlier if v != r.value])
            lp, acc = scores.mean_logprob[k : k + n], scores.token_acc[k : k + n]
            out.append(
                ProbeRecord(
                    eval_id=req.eval_id,
                    batch_id=batch_of(self.version),
                    edit_id=r.edit_id,
                    probe="retention",
                    prompt=r.prompt,
                    target=r.value,
                    logprob=float(lp[0]),
                    token_acc=float(acc[0]),
                    correct=retained(lp, acc),
                )
            )
            k += n
        return out
