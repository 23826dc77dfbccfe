"""The plain classes behind the runtime's Ray actors: the editor and the evaluator.

* :class:`EditorService` runs an editor over the shard actors and reports, per batch, the deltas
  (only changed tensors), timings, and the weight health of every edited matrix. A batch whose
  deltas fail the :mod:`~lme_sim.runtime.delta_guard` is undone (weights and editor state) and
  reported as rejected.
* :class:`Evaluator` keeps its own replica of the model, follows the editor through versioned
  deltas (never a full model copy after start-up) and scores probe sets in batched passes; every
  probe row records the model version it was scored on.
"""

from __future__ import annotations

import torch

from ..backbone import LocalBackbone
from ..cases import EditCase
from ..editors import editor_class, make_editor
from ..editors.base import PhaseTimer
from ..general_ability import MCItem, mc_accuracy
from ..metrics import case_metrics, fluency, summarize
from ..models import load_model, load_tokenizer
from ..scoring import score_targets
from .delta_guard import DEFAULT_MAX_DELTA_NORM, delta_problem
from .shards import ShardedBackbone


class EditorService:
    """Methods that work through shards edit them directly; methods that need the model in process
    (FT, RLEdit, HiEdit: ``Editor.in_process``) edit a local replica and the shards follow its deltas."""

    def __init__(self, model_name: str, shards: list, method: str, hparams: dict,
                 max_delta_norm: float = DEFAULT_MAX_DELTA_NORM):
        self.max_delta_norm = max_delta_norm
        self.backbone = ShardedBackbone(shards)
        self.local = None
        if editor_class(method).in_process:
            lm = load_model(model_name, progress=False)
            self.tok, self.world, self.local = lm.tok, lm.world, LocalBackbone(lm.model)
        else:
            self.tok, self.world = load_tokenizer(model_name)
        self.editor = make_editor(method, self.local or self.backbone, self.tok, model_name, hparams,
                                  world=self.world, progress=False)
        self.layers = list(self.editor.hp.layers)
        self.weight_stats()  # records the unedited weights where they live

    def edit(self, cases: list[EditCase]) -> dict:
        """Edit a batch; ``{"rejected": reason}`` if its deltas fail the guard: then the weights the
        editor wrote to during the batch and its state are put back as they were."""
        written = self.local or self.backbone  # where the editor writes while it edits
        norms = written.save_weights(self.layers)
        state = self.editor.state_dict()
        result = self.editor.edit(cases)
        problem = delta_problem(result.deltas, norms, self.max_delta_norm)
        if problem is not None:
            written.restore_weights()
            self.editor.load_state_dict(state)
            return {"rejected": problem, "timings": result.timings}
        timer = PhaseTimer(result.timings)
        if self.local is not None:
            with timer("sync"):  # the shards follow the local replica
                for name, d in result.deltas.items():
                    self.backbone.apply_delta(name, d)
        return {"deltas": result.deltas, "timings": dict(timer), "stats": result.stats, "touched": result.touched}

    def weight_stats(self) -> list[dict]:
        """Norms and condition number of every edited matrix, and the norm of its accumulated delta."""
        return [{"module": self.backbone.edit_param_name(l), **self.backbone.weight_stats(l)} for l in self.layers]

    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        """Bring the shards (and a local replica) to a checkpointed state (resume)."""
        for name, d in deltas.items():
            self.backbone.apply_delta(name, d)
            if self.local is not None:
                self.local.apply_delta(name, d)

    def state_dict(self) -> dict:
        return self.editor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.editor.load_state_dict(state)


class Evaluator:
    """``backend``: "hf" (an in-process replica on ``device`` in ``dtype``) or "vllm" (an engine;
    ``options``: VLLMOptions fields). ``general_items``: the run's multiple-choice set; its accuracy
    on the unedited model is the reference for ``general_ability_retention``."""

    def __init__(self, model_name: str, batch_size: int = 64, fluency_prompts: int = 0, backend: str = "hf",
                 options: dict | None = None, general_items: list[MCItem] | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        if backend == "vllm":
            from ..models import model_path
            from ..vllm_scorer import VLLMOptions, VLLMScorer

            self.tok = load_tokenizer(model_name)[0]
            self.backbone = VLLMScorer(model_path(model_name), VLLMOptions(**(options or {})))
        else:
            lm = load_model(model_name, dtype=getattr(torch, dtype), device=device, progress=False)
            self.backbone, self.tok = LocalBackbone(lm.model), lm.tok
        self.batch_size, self.fluency_prompts = batch_size, fluency_prompts
        self.version = 0
        self.general_items = list(general_items or [])
        self.general_before = (mc_accuracy(self.backbone, self.tok, self.general_items, batch_size)
                               if self.general_items else None)
        self.cum: dict[str, torch.Tensor] = {}  # the sum of the deltas applied so far

    def apply(self, deltas: dict[str, torch.Tensor], version: int) -> int:
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
        if isinstance(self.backbone, LocalBackbone):
            for name, d in deltas.items():
                self.backbone.apply_delta(name, d)
        else:
            self.backbone.apply(deltas)
        for name, d in deltas.items():
            self.cum[name] = self.cum[name] + d if name in self.cum else d.clone()

    @torch.no_grad()
    def evaluate(self, eval_id: int, step: int, retention: list[dict], recent: list[EditCase],
                 version: int | None = None) -> dict:
        """Retention probes (is each fact's latest value in force?) and the papers' metrics on the
        most recent edits. ``retention`` items: edit_id, prompt, value, earlier (values it replaced).
        ``version``: the model version this evaluation is for; a replica at another one scores
        nothing and answers ``{"behind": its version}``."""
        if version is not None and version != self.version:
            return {"behind": self.version}
        version = self.version
        prompts, targets, owner = [], [], []
        for i, r in enumerate(retention):
            for value in [r["value"]] + [v for v in r["earlier"] if v != r["value"]]:
                prompts.append(r["prompt"])
                targets.append(value)
                owner.append(i)
        scores = score_targets(self.backbone, self.tok, prompts, targets, self.batch_size)
        best: dict[int, float] = {}
        for k, i in enumerate(owner):
            if targets[k] != retention[i]["value"]:
                best[i] = max(best.get(i, float("-inf")), scores.mean_logprob[k].item())
        probes, first = [], {}
        for k, i in enumerate(owner):
            first.setdefault(i, k)
        for i, r in enumerate(retention):
            k = first[i]
            lp = scores.mean_logprob[k].item()
            probes.append({"eval_id": eval_id, "model_version": version, "step": step, "edit_id": r["edit_id"],
                           "probe": "retention", "prompt": r["prompt"], "target": r["value"], "logprob": lp,
                           "token_acc": scores.token_acc[k].item(), "correct": lp > best.get(i, float("-inf"))})
        metrics = summarize(case_metrics(self.backbone, self.tok, recent, self.batch_size)) if recent else {}
        if probes:
            metrics["retention"] = sum(p["correct"] for p in probes) / len(probes)
        if recent and self.fluency_prompts:
            metrics["fluency"] = fluency(self.backbone, self.tok, [c.prompt for c in recent[: self.fluency_prompts]])
        if self.general_items:
            metrics["general_ability"] = mc_accuracy(self.backbone, self.tok, self.general_items, self.batch_size)
            if self.general_before:
                metrics["general_ability_retention"] = metrics["general_ability"] / self.general_before
        rows = [{"eval_id": eval_id, "model_version": version, "step": step, "name": k, "value": float(v)}
                for k, v in metrics.items()]
        return {"probes": probes, "metrics": rows, "version": version}
