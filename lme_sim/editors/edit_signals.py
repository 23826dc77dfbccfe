"""What the learned editors read from and write into an in-process model.

* :func:`keys_and_grads`: per edited module, the input key k and the gradient g of the edit loss
  w.r.t. the module's output, at every token of prompt + target that the loss depends on (all
  but the last): W's gradient is exactly sum_t g_t k_t^T; MALMEN/RLEdit feed the pairs to their
  hypernetwork.
* :func:`answer_keys_and_grads` (``keys_and_grads(..., tokens="answers")``): UltraEdit's signals, k and
  g at the answer tokens only (the positions whose next token is a target token), for the mean
  cross-entropy over those tokens; through any :class:`~lme_sim.backbone.Backbone`, shards included.
* :func:`weight_offsets`: run the model as if W_l were W_l + Delta_l, differentiably in Delta_l
  (how a rollout scores an edit before it is written).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import DEFAULT_MODULE, edit_module_path
from ..backbone import LocalBackbone, Positions, as_backbone, chunk_size
from ..scoring import target_logprobs
from ..tokens import PairBatch
from .targets import frozen


@dataclass
class EditSignals:
    keys: dict[int, torch.Tensor]  # layer -> (n_tokens, d_ff)
    grads: dict[int, torch.Tensor]  # layer -> (n_tokens, d_model)
    owner: torch.Tensor  # (n_tokens,) row of the batch (edit) each token belongs to
    loss: torch.Tensor  # (n_rows,) mean NLL of each row's target before the edit


def per_row_nll(model, batch: PairBatch) -> torch.Tensor:
    """Mean NLL of each row's target tokens (differentiable where the model is)."""
    rows, lp, _ = target_logprobs(LocalBackbone(model), batch)
    total = torch.zeros(len(batch), device=lp.device).index_add(0, rows.to(lp.device), -lp)
    return total / batch.target_len.to(lp.device)


def keys_and_grads(model, batch: PairBatch, layers: list[int], tokens: str = "all") -> EditSignals:
    """One forward and backward pass: k and dL/d(W k) at every token but each row's last, for L the
    sum of the rows' mean target NLLs; ``tokens="answers"``: :func:`answer_keys_and_grads`."""
    if tokens == "answers":
        return answer_keys_and_grads(model, batch, layers)
    if tokens != "all":
        raise ValueError(f"tokens must be 'all' or 'answers', not {tokens!r}")
    length = batch.prompt_len + batch.target_len
    rows = torch.arange(len(batch)).repeat_interleave(length - 1)
    pos = torch.cat([torch.arange(n - 1) for n in length.tolist()])
    taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for l in layers:

        def tap(_m, args, out, l=l):
            zero = torch.zeros_like(out, requires_grad=True)  # d loss / d zero = d loss / d out
            taps[l] = (args[0].detach(), zero)
            return out + zero

        handles.append(model.get_submodule(edit_module_path(model, l)).register_forward_hook(tap))
    try:
        with frozen(model), torch.enable_grad():
            nll = per_row_nll(model, batch)
            grads = torch.autograd.grad(nll.sum(), [taps[l][1] for l in layers])
    finally:
        for h in handles:
            h.remove()
    dev = nll.device
    r, p = rows.to(dev), pos.to(dev)
    keys = {l: taps[l][0][r, p].float().cpu() for l in layers}
    outs = {l: g[r, p].float().cpu() for l, g in zip(layers, grads)}
    return EditSignals(keys, outs, rows, nll.detach().cpu())


def answer_keys_and_grads(
    model, batch: PairBatch, layers: list[int], chunk: int | None = None, module: str = DEFAULT_MODULE
) -> EditSignals:
    """k and g = dL/d(W k) at the answer tokens only (``batch.target_positions()``: the positions
    whose next token is a target token), for L = the mean cross-entropy over all answer tokens of
    the batch. Tokens come in ``target_positions`` order (row by row).

    ``chunk``: rows per forward/backward pass. Rows are sorted by length and cut into chunks, each
    trimmed to its longest row (less padding); the chunks' losses add up to L, so the result is
    that of one pass over the whole batch (up to float rounding). The chunks are independent (each its
    own forward and backward), so a pipelined backbone runs them at once
    (:meth:`~lme_sim.backbone.Backbone.map_chunks`). ``module``: which matrix of each block
    (:mod:`lme_sim.arch`): its input and the gradient w.r.t. its output."""
    backbone = as_backbone(model)
    rows, pos, _ = batch.target_positions()
    n_tok = len(rows)
    order = torch.argsort(batch.prompt_len + batch.target_len, stable=True)
    first = torch.cumsum(batch.target_len, 0) - batch.target_len  # each row's first token in ``rows``
    per = chunk_size(len(batch), chunk or len(batch), backbone.pipeline_depth())

    def signals(part: torch.Tensor):
        sub = batch.select(part)
        r, p, labels = sub.target_positions()
        k, g, nll = backbone.keys_and_output_grads(
            sub.input_ids, sub.attention_mask, Positions(r, p), labels, list(layers), module
        )
        index = first[part][r] + (p - (sub.prompt_len[r] - 1))  # position in ``rows``
        return k, {l: g[l] / n_tok for l in layers}, nll, index  # g: the mean over the answer tokens

    parts = backbone.map_chunks(signals, order.split(per))
    inv = torch.empty(n_tok, dtype=torch.long)
    inv[torch.cat([p[3] for p in parts])] = torch.arange(n_tok)
    nll = torch.cat([p[2] for p in parts])[inv]
    loss = torch.zeros(len(batch)).index_add(0, rows, nll) / batch.target_len
    return EditSignals(
        {l: torch.cat([p[0][l] for p in parts])[inv] for l in layers},
        {l: torch.cat([p[1][l] for p in parts])[inv] for l in layers},
        rows,
        loss,
    )


@contextmanager
def weight_offsets(model, deltas: dict[int, torch.Tensor]):
    """Inside the block, module l computes (W_l + deltas[l]) k; deltas in (d_model, d_ff) layout."""
    handles = []
    for l, D in deltas.items():

        def add(_m, args, out, D=D):
            return out + F.linear(args[0], D.to(device=out.device, dtype=out.dtype))

        handles.append(model.get_submodule(edit_module_path(model, l)).register_forward_hook(add))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
