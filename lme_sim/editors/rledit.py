"""RLEdit (Li et al. 2025, "Reinforced Lifelong Editing for Language Models", arXiv 2502.05759)
and HiEdit (arXiv 2604.11214): editors whose update is produced by a trained hypernetwork.

Per batch at run time: one forward/backward pass gives every edit token's key k and output
gradient g at each candidate module (:mod:`.edit_signals`), the hypernetwork turns them into
pseudo keys and value shifts, and one ridge solve per module gives its delta
(:mod:`.hypernet`). The cost per edit does not depend on how many edits came before.

HiEdit's router picks, per edit, ``top_k`` of the candidate modules (default half); a module
changes only through the tokens of the edits that picked it, and each edit's row in the
``edits`` table lists the modules it touched. Its hypernetwork starts as a trained RLEdit one
(:func:`.editor_training.train_editor`).

The networks come from a checkpoint made by ``lme-sim train-editor`` (:mod:`.editor_training`);
a checkpoint made for another model is refused. Without an explicit ``checkpoint`` the editor
uses the cached one for this model and these hyperparameters (what ``lme-sim train-editor`` writes
without ``--out``), training it first if missing: ``world:*`` models on their train split, others
on ``train_data``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch

from ..backbone import LocalBackbone
from ..cases import EditCase
from ..models import model_kind
from ..tokens import encode_pairs
from .base import Editor, EditResult, PhaseTimer, apply_layer_delta
from .checkpoints import CheckpointMismatch, check_model, load_checkpoint, model_fingerprint
from .edit_signals import keys_and_grads
from .editor_training import TrainingJob, default_checkpoint
from .hparams import HParamsError
from .hypernet import HiEditHParams, HyperNet, RLEditHParams, Router, Routing, build_networks, plan_deltas
from .registry import register


@register
class RLEdit(Editor):
    method = "rledit"
    hparams_class = RLEditHParams
    in_process = True
    trained = True
    # the learned editor whose trained networks this one's training starts from (None: from scratch);
    # `lme-sim train-editor --init-from` takes such a checkpoint, else the cached one is used
    starts_from: ClassVar[str | None] = None

    # ---- how its networks are trained (lme_sim.editors.editor_training) ---------------------------
    @classmethod
    def start_hparams(cls, hp: RLEditHParams) -> RLEditHParams:
        """The hyperparameters of the ``starts_from`` networks that training with ``hp`` starts from."""
        raise NotImplementedError(f"{cls.method} starts from no other editor's networks")

    @classmethod
    def networks_to_train(
        cls, hp: RLEditHParams, net_config: dict, init: dict | None, model
    ) -> tuple[HyperNet, Router | None, int | None]:
        """The networks training starts with, (hypernetwork, router, top_k): a fresh hypernetwork
        that writes into every module (``init``: unused)."""
        return HyperNet(**net_config), None, None

    @classmethod
    def train_lr(cls, hp: RLEditHParams) -> float:
        return hp.train_lr

    # ---- editing -------------------------------------------------------------------------------
    def __init__(self, lm, hparams, **kw):
        super().__init__(lm, hparams, **kw)
        if not isinstance(self.model, LocalBackbone):
            raise NotImplementedError(
                f"{self.method} reads per-token gradients and needs an in-process model"
            )
        path = hparams.checkpoint or default_checkpoint(
            TrainingJob(
                method=self.method,
                hp=hparams,
                model=self.model.model,
                tok=self.tok,
                model_name=self.model_name,
                world=self.world,
                progress=self.progress,
            )
        )
        self.checkpoint = str(path)
        ckpt = load_checkpoint(path, self.method)
        check_model(ckpt, self.model.model, path)
        if list(ckpt["layers"]) != list(hparams.layers):
            raise CheckpointMismatch(
                f"{path}: trained for layers {ckpt['layers']}, the scenario edits {hparams.layers}"
            )
        self.net, self.router = build_networks(ckpt)
        self.top_k = ckpt.get("top_k")
        # as the networks were trained
        self.fit_others = ckpt["hparams"].get("fit_others", True)
        self.route = ckpt["hparams"].get("route", "edit")

    @classmethod
    def check_hparams(cls, model_name: str, hp: RLEditHParams, where: str) -> None:
        """The networks must be trained for this model (``world:*`` models train their own on first use)."""
        field, ckpt = f"{where}.checkpoint", hp.checkpoint
        if ckpt is None:
            if hp.train_source is not None:
                from ..catalog import DATASETS

                if hp.train_source not in DATASETS:
                    raise HParamsError(
                        f"{where}.train_source: {hp.train_source!r} is not a named dataset "
                        f"(known: {', '.join(DATASETS)})"
                    )
                return  # downloaded before the run starts (preflight.named_datasets)
            if hp.train_data is not None:
                if not Path(hp.train_data).is_file():
                    raise HParamsError(f"{where}.train_data: file {hp.train_data!r} not found")
                return  # the cached networks, or trained on it first
            if not model_kind(model_name).has_world:
                raise HParamsError(
                    f"{field}: {cls.method} on {model_name!r} needs a checkpoint, train_data or "
                    f"train_source; make one with `lme-sim train-editor --method {cls.method} "
                    f"--model {model_name} --data <file>`"
                )
            return
        if not Path(ckpt).is_file():
            raise HParamsError(f"{field}: file {ckpt!r} not found")
        try:
            meta = torch.load(ckpt, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001  (any file can be named here)
            raise HParamsError(
                f"{field}: {ckpt!r} is not an editor checkpoint ({type(e).__name__})"
            ) from None
        if not isinstance(meta, dict):
            raise HParamsError(f"{field}: {ckpt!r} is not an editor checkpoint")
        if meta.get("method") != cls.method or meta.get("model") != model_name:
            raise HParamsError(
                f"{field}: {ckpt!r} is a {meta.get('method')!r} checkpoint for model "
                f"{meta.get('model')!r}, not {cls.method!r} for {model_name!r}"
            )

    @torch.no_grad()
    def edit(self, cases: list[EditCase]) -> EditResult:
        timer = PhaseTimer()
        layers = list(self.hp.layers)
        model = self.model.model
        with timer("keys"):
            batch = encode_pairs(self.tok, [c.prompt for c in cases], [c.target_new for c in cases])
            signals = keys_and_grads(model, batch, layers)
        with timer("solve"):
            routing = Routing(
                router=self.router, top_k=self.top_k, fit_others=self.fit_others, route=self.route
            )
            deltas, mask, _ = plan_deltas(self.net, signals, layers, len(cases), routing)
        names = {l: self.model.edit_param_name(l) for l in layers}
        touched = [
            [names[l] for i, l in enumerate(layers) if mask is None or mask[e, i] > 0]
            for e in range(len(cases))
        ]
        used = {n for t in touched for n in t}
        out, stats = {}, {"loss_before": signals.loss.mean().item()}
        with timer("apply"):
            for l, d in deltas.items():
                if names[l] in used:
                    name, stored = apply_layer_delta(self.model, l, d.float())
                    out[name] = stored
                    stats[f"delta_norm_l{l}"] = d.norm().item()
        stats["modules_per_edit"] = sum(len(t) for t in touched) / len(cases)
        return EditResult(out, dict(timer), stats, touched=touched)


@register
class HiEdit(RLEdit):
    """RLEdit's hypernetwork under a router that picks ``top_k`` modules per edit. Its training
    starts from a trained RLEdit network for the same model and modules (the cached one, trained
    first when missing, or ``lme-sim train-editor --init-from``); router and hypernetwork then train
    together at ``router_phase_lr`` (:mod:`.editor_training`)."""

    method = "hiedit"
    hparams_class = HiEditHParams
    starts_from = "rledit"

    @classmethod
    def start_hparams(cls, hp: HiEditHParams) -> RLEditHParams:
        """Its own RLEdit fields (for world models the same as rledit.yaml's, so the cached RLEdit
        network is shared); the router phase after it trains at ``router_phase_lr``."""
        return RLEditHParams(**hp.model_dump(include=set(RLEditHParams.model_fields) - {"checkpoint"}))

    @classmethod
    def networks_to_train(
        cls, hp: HiEditHParams, net_config: dict, init: dict | None, model
    ) -> tuple[HyperNet, Router | None, int | None]:
        """The RLEdit network ``init`` (checked: this model, these modules, this shape) with each
        module's step size times ``handover_scale`` (default n_candidates / top_k: each edit now
        writes into top_k modules, not all of them), and a fresh router."""
        layers = list(hp.layers)
        net = HyperNet(**net_config)  # before the router: the seeded draws as they always were
        top_k = hp.top_k or max(1, len(layers) // 2)
        router = Router(net_config["d_ff"] + net_config["d_model"], len(layers))
        _check_start(init, model, layers, net_config)
        net.load_state_dict(init["net"])
        with torch.no_grad():
            net.log_lr += math.log(hp.handover_scale or len(layers) / top_k)
        return net, router, top_k

    @classmethod
    def train_lr(cls, hp: HiEditHParams) -> float:
        return hp.router_phase_lr


def _check_start(init: dict, model, layers: list[int], net_config: dict) -> None:
    """HiEdit's starting network must be an RLEdit one for this model, these modules, this shape."""
    if init.get("method") != "rledit":
        raise CheckpointMismatch(f"HiEdit starts from an RLEdit checkpoint, not a {init.get('method')!r} one")
    if init["fingerprint"] != model_fingerprint(model):
        raise CheckpointMismatch(
            f"the RLEdit checkpoint to start from was trained for model {init['model']!r} "
            f"(fingerprint {init['fingerprint']}), not for this one ({model_fingerprint(model)})"
        )
    if list(init["layers"]) != layers or init["net_config"] != net_config:
        raise CheckpointMismatch(
            f"the RLEdit checkpoint to start from has layers {init['layers']} and network "
            f"{init['net_config']}; HiEdit here needs layers {layers} and {net_config}"
        )
