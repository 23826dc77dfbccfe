"""Norm-Anchor Scaling (NAS, arXiv 2602.02543), a plug-in for MEMIT and AlphaEdit (``hparams.norm_anchor``).

Target optimization (:mod:`.targets`) solves a shift delta of layer L's output at the subject's last
token. NAS reads it as a shift of the MLP's output there: v* = v0 + delta, with v0 the MLP output of
layer L on the rewrite prompt, and anchors the norm of v* to a reference taken on the original model:

    ref  = mean ||v*|| over ``n_samples`` requests solved on the unedited model, the norms above the
           ``upper_quantile`` dropped                          (published: 1,000 CounterFact rewrites, 0.95)
    v*'  = v* ref / ||v*||            where ||v*|| <= skip_factor ref
    v*'  = v0 (the request writes nothing)   where ||v*|| >  skip_factor ref      (published: 2)

and the target becomes z' = h + (v*' - v0). The published code: ``NAS/compute_z.py`` lines 214-235
(the paper's NAS, on AlphaEdit) and ``baselines/memit/compute_z.py`` lines 207-228 (MEMIT with
``use_nas``): v* = delta + v0, the skip above twice the mean, ``scale_vector_to_norm``; the reference in
``util/vstar_stats.py`` (``_compute_mean_vstar_norm_from_multicounterfact``: sampled with seed 0;
``_upper_trimmed_mean`` with ``_NAS_OUTLIER_UPPER_QUANTILE = 0.95``). Differences, lme-sim's own: v0 is
the edit module's product W k at the subject's last token (no bias: Llama-family MLPs have none; GPT-2's
constant c_proj bias is left out), and the reference requests come from ``path`` (a CounterFact or ZsRE
file; the embedded world's edit cases on ``world:*`` models), solved with the editor's own target
hyperparameters; the published code reads MEMIT's hyperparameter file of the same model for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random

import torch

from ..cases import EditCase
from ..paths import cache_root
from .activations import activations_at
from .hparams import NormAnchorHParams

log = logging.getLogger(__name__)


def anchor_deltas(delta: torch.Tensor, v0: torch.Tensor, ref: float, skip_factor: float) -> torch.Tensor:
    """Shifts (n, d) whose values v0 + shift have norm ``ref``: v* = v0 + delta rescaled to ``ref``,
    or v0 itself (shift 0) where ||v*|| > skip_factor * ref."""
    v = v0 + delta
    norm = v.norm(dim=1, keepdim=True)
    scaled = v * (ref / norm.clamp_min(1e-12))
    return torch.where(norm > skip_factor * ref, v0, scaled) - v0


def upper_trimmed_mean(norms: torch.Tensor, upper_quantile: float) -> float:
    """The mean of the values at or below their ``upper_quantile`` quantile."""
    cut = torch.quantile(norms.double(), upper_quantile)
    return float(norms[norms.double() <= cut].double().mean())


def mlp_values(model, tok, cases: list[EditCase], layer: int, batch_size: int) -> torch.Tensor:
    """v0 (n, d_model): the edit module's output W k at the subject's last token of each rewrite prompt."""
    prompts, subjects = [c.prompt for c in cases], [c.subject for c in cases]
    k = activations_at(model, tok, prompts, subjects, [layer], kind="key", batch_size=batch_size)[layer]
    return k @ model.edit_weight(layer).float().T


def reference_cases(spec: NormAnchorHParams, world) -> list[EditCase]:
    """``n_samples`` requests drawn (seeded) from ``spec.path`` or the named dataset ``spec.source``, or
    the world's edit cases."""
    if spec.path is None and spec.source is None:
        if world is None:
            raise ValueError("norm_anchor.path: needed for a model without an embedded world")
        return world.edit_cases(spec.n_samples, seed=spec.seed + 7919)
    from ..catalog import resolve
    from ..data import load_cases

    pool = load_cases(str(spec.path or resolve(spec.source)))
    return random.Random(spec.seed).sample(pool, min(spec.n_samples, len(pool)))


def reference_norm(editor, spec: NormAnchorHParams, layer: int) -> float:
    """NAS's reference ||v*|| at ``layer`` for ``editor``'s model and target hyperparameters: read from
    ``$LME_SIM_CACHE/norm_anchor`` where computed before, else solved on the model as it is now (an
    editor is built on the unedited model) and cached."""
    from .targets import compute_targets

    hp = editor.hp
    cases = reference_cases(spec, editor.world)
    requests = hashlib.sha256("\n".join(f"{c.prompt}\t{c.target_new}" for c in cases).encode()).hexdigest()
    key = json.dumps(
        {
            "model": editor.model_name,
            "layer": layer,
            "anchor": spec.model_dump(exclude={"path", "source"}),
            "requests": requests,  # the sampled requests themselves, however the file was named
            "targets": hp.model_dump(include=TARGET_FIELDS),
            "contexts": editor.contexts,
        },
        sort_keys=True,
    )
    path = cache_root() / "norm_anchor" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())["reference_norm"]
    log.info("NAS: the reference norm over %d requests at layer %d", len(cases), layer)
    norms = []
    chunk = max(1, hp.rows_per_pass // (len(editor.contexts) + 1))
    from tqdm.auto import tqdm

    for s in tqdm(
        range(0, len(cases), chunk), desc=f"NAS reference ||v*|| (layer {layer})", disable=not editor.progress
    ):
        part = cases[s : s + chunk]
        t = compute_targets(
            editor.model, editor.tok, part, layer=layer, contexts=editor.contexts, hp=hp, reuse=editor.reuse
        )
        v0 = mlp_values(editor.model, editor.tok, part, layer, hp.rows_per_pass)
        norms.append((v0 + t.delta).norm(dim=1))
    ref = upper_trimmed_mean(torch.cat(norms), spec.upper_quantile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reference_norm": ref, "n": len(cases), "key": json.loads(key)}))
    tmp.rename(path)
    return ref


# the target hyperparameters a reference norm depends on
TARGET_FIELDS = {
    "layers",
    "v_lr",
    "v_num_grad_steps",
    "v_loss_stop",
    "v_weight_decay",
    "kl_factor",
    "clamp_norm_factor",
    "kl_prompt",
    "context_templates",
}
