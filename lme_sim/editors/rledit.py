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
a checkpoint made for another model is refused. For ``world:*`` models without an explicit
``checkpoint`` one is trained on first use and cached.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import arch_of
from ..backbone import LocalBackbone
from ..cases import EditCase
from ..tokens import encode_pairs
from .base import EditResult, Editor, PhaseTimer, apply_layer_delta, register
from .edit_signals import EditSignals, keys_and_grads
from .hypernet import HyperNet, Router, top_k_mask


class CheckpointMismatch(ValueError):
    pass


def model_fingerprint(model) -> str:
    """A short hash of the model's configuration and its (never edited) token embeddings."""
    import hashlib
    import json

    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)},
                        sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight.detach().float().flatten()[: 1 << 16].cpu()
    h.update(emb.numpy().tobytes())
    return h.hexdigest()[:16]


def plan_deltas(net: HyperNet, signals: EditSignals, layers: list[int], n_edits: int,
                router: Router | None = None, top_k: int | None = None, sample: bool = False,
                generator: torch.Generator | None = None):
    """Deltas per layer from the hypernetwork; with a router also the (n_edits, n_layers) mask of
    chosen modules (straight-through) and log pi of each edit's choice."""
    mask = log_pi = None
    if router is not None:
        feats = []
        for l in layers:
            f = net.features(signals.keys[l], signals.grads[l])
            summed = torch.zeros(n_edits, f.shape[1]).index_add(0, signals.owner, f)
            counts = torch.bincount(signals.owner, minlength=n_edits).clamp_min(1)[:, None]
            feats.append(summed / counts)
        mask, log_pi = top_k_mask(router(torch.stack(feats, 1)), top_k, sample, generator)
    deltas = {}
    for i, l in enumerate(layers):
        weight = mask[signals.owner, i] if mask is not None else None
        deltas[l] = net.delta(signals.keys[l], signals.grads[l], i, weight)
    return deltas, mask, log_pi


def build_networks(ckpt: dict) -> tuple[HyperNet, Router | None]:
    net = HyperNet(**ckpt["net_config"])
    net.load_state_dict(ckpt["net"])
    router = None
    if ckpt.get("router") is not None:
        router = Router(net.d_ff + net.d_model, ckpt["net_config"]["n_modules"])
        router.load_state_dict(ckpt["router"])
    return net.eval(), router


@register
class RLEdit(Editor):
    method = "rledit"
    in_process = True

    def __init__(self, model, tok, hparams, world=None, progress: bool = True, model_name: str | None = None):
        super().__init__(model, tok, hparams, world, progress, model_name)
        if not isinstance(self.model, LocalBackbone):
            raise NotImplementedError(f"{self.method} reads per-token gradients and needs an in-process model")
        from .editor_training import default_checkpoint

        path = hparams.checkpoint or default_checkpoint(self.method, model_name, hparams, self.model.model, tok,
                                                       world, progress)
        self.checkpoint = str(path)
        ckpt = load_checkpoint(path, self.method)
        check_model(ckpt, self.model.model, path)
        if list(ckpt["layers"]) != list(hparams.layers):
            raise CheckpointMismatch(f"{path}: trained for layers {ckpt['layers']}, the scenario edits {hparams.layers}")
        self.net, self.router = build_networks(ckpt)
        self.top_k = ckpt.get("top_k")

    @classmethod
    def prepare(cls, model_name: str, hparams: dict, progress: bool = True) -> dict:
        """Point a ``world:*`` run without a checkpoint at the cached one (trained here if missing)."""
        if hparams.get("checkpoint"):
            return hparams
        from ..models import load_model
        from .editor_training import default_checkpoint
        from .hparams import load_hparams

        lm = load_model(model_name, progress=progress)
        hp = load_hparams(cls.method, model_name, hparams)
        path = default_checkpoint(cls.method, model_name, hp, lm.model, lm.tok, lm.world, progress)
        return {**hparams, "checkpoint": str(path)}

    @torch.no_grad()
    def edit(self, cases: list[EditCase]) -> EditResult:
        timer = PhaseTimer()
        layers = list(self.hp.layers)
        model = self.model.model
        with timer("keys"):
            batch = encode_pairs(self.tok, [c.prompt for c in cases], [c.target_new for c in cases])
            signals = keys_and_grads(model, batch, layers)
        with timer("solve"):
            deltas, mask, _ = plan_deltas(self.net, signals, layers, len(cases), self.router, self.top_k)
        names = {l: self.model.edit_param_name(l) for l in layers}
        touched = [[names[l] for i, l in enumerate(layers) if mask is None or mask[e, i] > 0]
                   for e in range(len(cases))]
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
    method = "hiedit"


def load_checkpoint(path, method: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no editor checkpoint here; make one with "
                                f"`lme-sim train-editor --method {method} --model <model> --out {path}`")
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    if ckpt.get("method") != method:
        raise CheckpointMismatch(f"{path}: a {ckpt.get('method')!r} checkpoint, not {method!r}")
    return ckpt


def check_model(ckpt: dict, model, path) -> None:
    fp = model_fingerprint(model)
    if ckpt["fingerprint"] != fp or ckpt["arch"] != arch_of(model).layers + "/" + arch_of(model).edit_module:
        raise CheckpointMismatch(
            f"{path}: this {ckpt['method']} checkpoint was trained for model {ckpt['model']!r} "
            f"(fingerprint {ckpt['fingerprint']}), not for this model (fingerprint {fp}); "
            f"train one for it with `lme-sim train-editor --method {ckpt['method']} --model <model>`")
