"""Constrained fine-tuning (FT-L; Zhu et al. 2020, "Modifying Memories in Transformer Models",
arXiv 2012.00363, as the baseline in ROME): Adam on W of the chosen layers to lower the new
objects' NLL, with |W - W0|_inf <= norm_constraint enforced after every step."""

from __future__ import annotations

import torch

from ..backbone import LocalBackbone
from ..cases import EditCase
from ..scoring import target_logprobs
from ..tokens import encode_pairs
from .base import Editor, EditResult, PhaseTimer
from .hparams import HParams
from .registry import register
from .targets import frozen


class FTHParams(HParams):
    """Constrained fine-tuning of W (Zhu et al. 2020, as the FT-L baseline in ROME)."""

    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 5e-4  # |W - W0|_inf after every step
    loss_stop: float = 1e-2


@register
class FT(Editor):
    method = "ft"
    hparams_class = FTHParams
    in_process = True

    def edit(self, cases: list[EditCase]) -> EditResult:
        hp, backbone = self.hp, self.model
        if not isinstance(backbone, LocalBackbone):
            raise NotImplementedError("FT trains weights in place and needs an in-process model, not shards")
        model = backbone.model
        timer = PhaseTimer()
        named = dict(model.named_parameters())
        names = [backbone.edit_param_name(l) for l in hp.layers]
        params = [named[n] for n in names]
        originals = [p.detach().clone() for p in params]
        batch = encode_pairs(self.tok, [c.prompt for c in cases], [c.target_new for c in cases])
        opt = torch.optim.Adam(params, lr=hp.lr)
        loss_value, steps = float("nan"), 0
        with timer("solve"), frozen(model):
            for p in params:
                p.requires_grad_(True)
            for steps in range(hp.num_steps):  # noqa: B007  (the count is reported)
                rows, lp, _ = target_logprobs(backbone, batch)
                per_row = torch.zeros(len(batch), device=lp.device).index_add(0, rows.to(lp.device), -lp)
                loss = (per_row / batch.target_len.to(lp.device)).mean()
                loss_value = loss.item()
                if loss_value < hp.loss_stop:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for p, p0 in zip(params, originals):
                        p.copy_(torch.clamp(p, p0 - hp.norm_constraint, p0 + hp.norm_constraint))
        deltas = {n: (p.detach() - p0) for n, p, p0 in zip(names, params, originals)}
        stats = {
            "loss": loss_value,
            "steps": steps,
            **{f"delta_norm_{n}": d.norm().item() for n, d in deltas.items()},
        }
        return EditResult(deltas, dict(timer), stats)
