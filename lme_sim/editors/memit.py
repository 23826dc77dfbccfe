"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer", arXiv 2210.07229).

For each edited layer l in order (Alg. 1): recompute the keys K (d_ff x n) on the current model
and the residual R = (Z - H_L) / (remaining layers), then (eq. 14)

    Delta_l = R K^T (lambda C0 + K K^T)^-1

AlphaEdit subclasses this and changes only :meth:`MEMIT.solve` and :meth:`MEMIT.after_batch`.

With ``reuse`` (the default) nothing an edit cannot change is computed twice: target optimization
runs only what its deltas can change (:mod:`lme_sim.editors.targets`), the passes for layer l's keys
end at block l, and the keys of the loop are the batch's keys on the edited model (edits at layers
>= l cannot change layer l's keys) for :meth:`after_batch`. ``reuse = False``: the reference passes.
"""

from __future__ import annotations

import torch

from ..cases import EditCase
from .activations import activations_at, compute_keys, context_groups, context_templates
from .base import Editor, EditResult, PhaseTimer, apply_layer_delta
from .covariance import cached_second_moment
from .hparams import TargetHParams
from .norm_anchor import anchor_deltas, mlp_values, reference_norm
from .registry import register
from .targets import Targets, compute_targets


class MEMITHParams(TargetHParams):
    mom2_update_weight: float = 15000.0  # lambda in  Delta = R K^T (lambda C0 + K K^T)^-1


@register
class MEMIT(Editor):
    method = "memit"
    hparams_class = MEMITHParams
    reuse = True  # False: every pass runs the whole model (the reference path)

    def __init__(self, lm, hparams, **kw):
        super().__init__(lm, hparams, **kw)
        self.contexts = context_templates(self.model, self.tok, hparams.context_templates)
        self.context_groups = context_groups(hparams.context_templates)  # how keys average over them
        self.load_statistics()
        anchor = hparams.norm_anchor  # NAS: the reference ||v*||, on the unedited model (cached)
        self.anchor_norm = None if anchor is None else reference_norm(self, anchor, hparams.layers[-1])

    def load_statistics(self) -> None:
        """C0 of every edited layer (cached on disk; computed through the shards on first use)."""
        self.C0 = cached_second_moment(self.lm, self.hp.layers, self.hp.stats, progress=self.progress)

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """MEMIT eq. 14: Delta = R K^T (lambda C0 + K K^T)^-1 (K: d_ff x n, R: d x n)."""
        A = self.hp.mom2_update_weight * self.C0[layer] + K @ K.T
        return R @ torch.linalg.solve(A, K).T

    def after_batch(self, cases: list[EditCase], keys: dict[int, torch.Tensor] | None = None) -> None:
        """Hook for state updates once the whole batch is written; ``keys``: layer -> K (n, d_ff) of the
        batch on the edited model, where known."""

    def targets(self, cases: list[EditCase]) -> Targets:
        """The target z of layer L (the last edited) for every case; with ``norm_anchor`` (NAS), each
        shift read as a change of the MLP's value and anchored to the reference norm
        (:func:`~.norm_anchor.anchor_deltas`)."""
        hp, z_layer = self.hp, self.hp.layers[-1]
        t = compute_targets(
            self.model, self.tok, cases, layer=z_layer, contexts=self.contexts, hp=hp, reuse=self.reuse
        )
        if hp.norm_anchor is None:
            return t
        v0 = mlp_values(self.model, self.tok, cases, z_layer, hp.rows_per_pass)
        shift = anchor_deltas(t.delta, v0, self.anchor_norm, hp.norm_anchor.skip_factor)
        return Targets(z=t.h_init + shift, h_init=t.h_init, steps=t.steps, loss=t.loss)

    def edit(self, cases: list[EditCase]) -> EditResult:
        self.commit()  # the previous batch's pending state, where nobody committed it
        hp, model, tok = self.hp, self.model, self.tok
        timer = PhaseTimer()
        z_layer = hp.layers[-1]
        with timer("targets"):
            targets = self.targets(cases)
        prompts, subjects = [c.prompt for c in cases], [c.subject for c in cases]
        keys: dict[int, torch.Tensor] = {}
        deltas, stats = (
            {},
            {
                "target_steps_mean": targets.steps.float().mean().item(),
                "target_loss_mean": targets.loss.mean().item(),
            },
        )
        for i, layer in enumerate(hp.layers):
            with timer("keys"):
                K = keys[layer] = compute_keys(
                    model,
                    tok,
                    cases,
                    [layer],
                    self.contexts,
                    groups=self.context_groups,
                    batch_size=hp.rows_per_pass,
                    early_stop=self.reuse,
                )[layer]
                cur = activations_at(
                    model,
                    tok,
                    prompts,
                    subjects,
                    [z_layer],
                    kind="hidden",
                    batch_size=hp.rows_per_pass,
                    early_stop=self.reuse,
                )[z_layer]
            with timer("solve"):
                R = (targets.z - cur) / (len(hp.layers) - i)
                delta = self.solve(layer, K.T.double(), R.T.double()).float()
            with timer("apply"):
                name, stored = apply_layer_delta(model, layer, delta)
            deltas[name] = stored
            stats[f"delta_norm_l{layer}"] = delta.norm().item()
        with timer("keys"):  # AlphaEdit: the batch's keys on the edited model
            # layer l's keys once the layers below l were written are those of the edited model
            self.after_batch(cases, keys if self.reuse and hp.layers == sorted(hp.layers) else None)
        return EditResult(deltas, dict(timer), stats)
