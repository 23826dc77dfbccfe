"""Target optimization's repeated passes, cut down to the part an injected vector can change.

Target optimization (:mod:`lme_sim.editors.targets`) adds a vector delta_r to the output of block
L at s_r, the last subject token of row r (in every row, KL rows included), and reads logits only
at positions >= s_r. With causal attention and right padding:

* no position before s_r attends to s_r, so every hidden state, key and value at positions < s_r
  is the same for every delta, in every block;
* blocks 0..L run before the delta is added, so their outputs do not depend on it at any position.

So one pass without gradients per batch (:func:`prefix_pass`) keeps, for every block l > L, the
keys and values of positions < s_r (an attention cache) and block L's output at positions >= s_r,
before the delta. Each optimizer step (:func:`suffix_pass`) then runs only blocks L+1..N-1, on the
positions s_r, s_r + 1, ... of each row (the *suffix*, left-aligned: suffix position j is position
s_r + j, which is what RoPE or GPT-2's position embedding saw), attending to the cached prefix of
its own row. The cache is only read: each step concatenates new tensors.

Decoder blocks are called directly, so each architecture needs what its blocks take besides the
hidden states and the mask (:func:`_block_kwargs`): GPT-2 nothing (its position embedding is added
at the input), GPT-J the position ids (its blocks compute their rotary embedding), GPT-NeoX and the
Llama family RoPE's cos/sin (Gemma 3 one per attention type: local and global layers use different
bases). A sliding-window block (Mistral, Qwen2/3 where set, Gemma 2/3's local layers) gets its window
in its mask (:func:`attention_window`). Every architecture of :data:`lme_sim.arch.ARCHS` is handled;
tests/test_architectures.py checks each against the full passes.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ARCHS, arch_of, decoder_of, layer_path, logits_of, n_layers
from .hooks import Positions, _hidden, _replace_input, _StopForward

# architectures whose blocks :func:`suffix_pass` knows how to call: every one in the architecture table
# (tests/test_architectures.py checks each against the reference passes)
SUFFIX_ARCHS = tuple(ARCHS)
_CACHE_KWARG = {"gptj": "layer_past", "gpt_neox": "layer_past"}  # default: past_key_values


def supports_suffix(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in SUFFIX_ARCHS


def attention_window(model: nn.Module, layer: int) -> int | None:
    """The sliding window of block ``layer``'s attention (a query at q sees keys k > q - window), or
    None (every earlier position), as the model's own masks have it: per layer where the config lists
    ``layer_types``, else every layer where it sets ``sliding_window`` (Mistral, Phi-3)."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


@dataclass
class PrefixCache:
    """What one model (or one shard: the blocks it owns) keeps for one batch of rows."""

    layer: int  # L: the delta is added to this block's output
    start: torch.Tensor  # (B,) s_r: the first position the delta can change
    length: torch.Tensor  # (B,) real tokens from s_r on: the suffix length of each row
    # block l > L -> K, V (B, kv heads, P, head dim) of positions < P = max s_r (row r's: < s_r)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    h: torch.Tensor | None  # (B, S, d) block L's output at s_r + j, S = max length (the owner of L only)


def _block(model: nn.Module, l: int) -> nn.Module:
    return model.get_submodule(layer_path(model, l))


def _suffix_of(h: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, S, d): row r's positions start_r + j, j < S (past a row's end: clamped, unused)."""
    j = torch.arange(int(length.max()), device=h.device)
    idx = (start.to(h.device)[:, None] + j).clamp_max(h.shape[1] - 1)  # (B, S)
    return h[torch.arange(h.shape[0], device=h.device)[:, None], idx]


@torch.no_grad()
def prefix_pass(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: torch.Tensor,
    layer: int,
    *,
    logits: Positions | None = None,
    layers: range | None = None,
    hidden_in: torch.Tensor | None = None,
):
    """One ordinary forward pass (no delta, no gradients) that keeps the :class:`PrefixCache` of the
    blocks in ``layers`` (default: all; ``hidden_in``: a shard's input, as in
    :func:`~lme_sim.backbone.run_plan`). Returns (cache, logits at ``logits`` where this pass reaches
    the head else None, hidden states for the next shard or None)."""
    dev = model.device
    layers = layers if layers is not None else range(n_layers(model))
    last = layers.stop == n_layers(model)
    start, length = start.cpu(), attention_mask.sum(1).cpu() - start.cpu()
    if (length < 1).any():
        raise ValueError("every row needs its subject's last token inside the row")
    from transformers import DynamicCache

    # filled by the blocks this model owns; no config: a sliding-window layer keeps every position too
    cache = DynamicCache()
    kept: dict[str, torch.Tensor] = {}
    boundary: list[torch.Tensor] = []
    with ExitStack() as stack:

        def hook(module, fn):
            stack.callback(module.register_forward_hook(fn).remove)

        if hidden_in is not None:
            _replace_input(_block(model, layers.start), hidden_in.to(dev), stack)
        if layer in layers:

            def keep(_m, _a, o):
                kept["h"] = _suffix_of(_hidden(o), start, length)

            hook(_block(model, layer), keep)
        if not last:

            def halt(_m, _a, o):
                boundary.append(_hidden(o))
                raise _StopForward

            hook(_block(model, layers.stop - 1), halt)
        try:
            result = model.base_model(
                input_ids=input_ids.to(dev),
                attention_mask=attention_mask.to(dev),
                past_key_values=cache,
                use_cache=True,
            )
        except _StopForward:
            result = None
    P = int(start.max())
    kv = {
        l: (cache.layers[l].keys[:, :, :P].clone(), cache.layers[l].values[:, :, :P].clone())
        for l in layers
        if l > layer
    }
    out = None
    if result is not None and logits is not None:
        h = result.last_hidden_state[logits.rows.to(dev), logits.pos.to(dev)]
        out = logits_of(model, h)
    pc = PrefixCache(layer, start, length, kv, kept.get("h"))
    return pc, out, (boundary[0] if boundary else None)


def suffix_mask(
    start: torch.Tensor,
    length: torch.Tensor,
    P: int,
    S: int,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """(b, 1, S, P + S) additive mask: suffix position i of row r sees the prefix positions j < s_r
    and the real suffix positions j <= i (a padded i sees itself too: no empty row); with ``window``
    only the keys less than ``window`` positions back (absolute positions, as Hugging Face's
    sliding-window masks)."""
    i = torch.arange(S)
    prefix_ok = (torch.arange(P)[None, :] < start[:, None])[:, None, :].expand(-1, S, -1)  # (b, S, P)
    suffix_ok = (i[None, None, :] <= i[None, :, None]) & (
        (i[None, None, :] < length[:, None, None]) | (i[None, None, :] == i[None, :, None])
    )  # (b, S, S)
    ok = torch.cat([prefix_ok, suffix_ok], -1)
    if window is not None:
        q = start[:, None] + i  # (b, S) absolute positions of the queries
        k = torch.cat([torch.arange(P)[None, :].expand(len(start), -1), q], 1)  # (b, P + S) of the keys
        ok = ok & (k[:, None, :] > q[:, :, None] - window)
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)[:, None]


class _PrefixKV:
    """Stands in for a KV cache inside a block: the cached prefix's keys and values followed by the
    suffix's own, as new tensors (the cache itself is never written)."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], 2), torch.cat([v, value_states], 2)


def _block_kwargs(model: nn.Module, h: torch.Tensor, pos: torch.Tensor, layer: int, rope: dict) -> dict:
    """What block ``layer`` takes besides its input, mask and cache, for absolute positions ``pos``
    (b, S); ``rope``: RoPE's cos/sin per attention type, computed once per call of the caller."""
    kind = model.config.model_type
    if kind == "gpt2":
        return {}  # the position embedding was added at the input, long before block L
    if kind == "gptj":
        return {"position_ids": pos}  # its attention computes its rotary embedding from the ids
    if kind not in SUFFIX_ARCHS:
        raise NotImplementedError(f"suffix passes do not know {kind!r} blocks (known: {SUFFIX_ARCHS})")
    rotary = decoder_of(model).rotary_emb
    if kind == "gemma3_text":  # local and global layers rotate with different bases
        kind_of_layer = model.config.layer_types[layer]
        if kind_of_layer not in rope:
            rope[kind_of_layer] = rotary(h, pos, kind_of_layer)
        return {"position_embeddings": rope[kind_of_layer], "position_ids": pos}
    if "all" not in rope:
        rope["all"] = rotary(h, position_ids=pos)
    return {"position_embeddings": rope["all"], "position_ids": pos}


def length_groups(length: torch.Tensor, overhead: int = 32) -> list[torch.Tensor]:
    """Rows (indices into ``length``) in groups of similar suffix length, each run as one padded batch:
    the rows sorted by length, cut into runs minimizing padded tokens + ``overhead`` per group (a
    smaller batch runs its matrix products less efficiently)."""
    order = torch.argsort(length, stable=True)
    ls = length[order].tolist()
    n = len(ls)
    # best[j]: the cost of the rows order[:j]; cut[j]: where the last of their groups starts
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            if i == 0 or ls[i] != ls[i - 1]:  # never split rows of equal length
                cost = best[i] + (j - i) * ls[j - 1] + overhead
                if best[j] is None or cost < best[j]:
                    best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _run_blocks(model: nn.Module, pc: PrefixCache, rows: torch.Tensor, h: torch.Tensor, blocks: list[int]):
    """Blocks ``blocks`` on ``h`` (b, S, d), the suffixes of ``rows``, attending to their cached prefixes."""
    start = pc.start[rows]
    P = int(start.max())
    kv = {
        l: (k[rows.to(k.device), :, :P], v[rows.to(v.device), :, :P])
        for l, (k, v) in pc.kv.items()
        if l in blocks
    }
    return run_on_prefix(model, kv, start, pc.length[rows], h, blocks)


def run_on_prefix(
    model: nn.Module,
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
    start: torch.Tensor,
    length: torch.Tensor,
    h: torch.Tensor,
    blocks: list[int],
) -> torch.Tensor:
    """Blocks ``blocks`` on ``h`` (b, S, d): row r's positions start_r + j (j < length_r real, the rest
    padding), attending to the cached keys and values ``kv`` (block -> K, V (b, kv heads, >= max start,
    head dim)) of its positions < start_r. Returns the last block's output (b, S, d)."""
    dev = h.device
    start, length = start.cpu(), length.cpu()
    P, S = int(start.max()), h.shape[1]
    pos = (start[:, None] + torch.arange(S)).to(dev)  # (b, S) absolute positions
    masks: dict[int | None, torch.Tensor] = {}  # window -> (b, 1, S, P + S)
    cache = _PrefixKV({l: (k[:, :, :P], v[:, :, :P]) for l, (k, v) in kv.items() if l in blocks})
    cache_kwarg = _CACHE_KWARG.get(model.config.model_type, "past_key_values")
    rope: dict = {}
    for l in blocks:
        w = attention_window(model, l)
        if w not in masks:
            masks[w] = suffix_mask(start, length, P, S, h.dtype, w).to(dev)
        kwargs = _block_kwargs(model, h, pos, l, rope)
        h = _hidden(_block(model, l)(h, attention_mask=masks[w], **{cache_kwarg: cache}, **kwargs))
    return h


def embed(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The input of block 0 for token ``ids`` (b, S) at absolute positions ``pos`` (b, S)."""
    kind = model.config.model_type
    if kind not in SUFFIX_ARCHS:
        raise NotImplementedError(f"suffix passes do not know {kind!r} blocks (known: {SUFFIX_ARCHS})")
    h = model.get_input_embeddings()(ids)  # Gemma's embedding module scales by sqrt(d) itself
    if kind == "gpt2":
        return h + decoder_of(model).wpe(pos)
    return h  # rotary embeddings are applied inside the blocks (:func:`_block_kwargs`)


def suffix_pass(
    model: nn.Module,
    pc: PrefixCache,
    rows: torch.Tensor,
    values: torch.Tensor | None = None,
    at: Positions | None = None,
    *,
    layers: range | None = None,
    hidden_in: torch.Tensor | None = None,
):
    """Blocks L+1.. of ``layers`` on the suffix of ``rows`` (indices into the prefix pass's rows).

    ``values`` (b, d) is added to block L's cached output at suffix position 0 (the subject's last
    token) where this model owns block L; otherwise ``hidden_in`` is the input (what the previous
    shard returned). ``at``: (row in ``rows``, suffix position) pairs where the logits are read.
    Rows run in groups of similar suffix length (:func:`length_groups`); between shards the hidden
    states of the groups travel packed, (sum over groups of rows x length, d). Returns (logits or
    None, packed hidden states for the next shard or None); differentiable w.r.t. ``values`` and
    ``hidden_in``.
    """
    dev = model.device
    layers = layers if layers is not None else range(n_layers(model))
    rows = rows.cpu()
    groups = length_groups(pc.length[rows])  # each: indices into ``rows``
    widths = [int(pc.length[rows[g]].max()) for g in groups]
    if pc.layer in layers:
        hs = []
        for g, S in zip(groups, widths):
            h = pc.h[rows[g].to(pc.h.device), :S]  # (b_g, S_g, d)
            v = values[g.to(values.device)].to(h.device, h.dtype)
            hs.append(torch.cat([h[:, :1] + v[:, None], h[:, 1:]], 1))
    else:
        sizes = [len(g) * S for g, S in zip(groups, widths)]
        hs = [x.view(len(g), S, -1) for x, g, S in zip(hidden_in.to(dev).split(sizes), groups, widths)]
    blocks = [l for l in layers if l > pc.layer]
    if blocks:
        hs = [_run_blocks(model, pc, rows[g], h, blocks) for g, h in zip(groups, hs)]
    if layers.stop < n_layers(model):
        return None, torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])
    group_of, index_in = torch.empty(len(rows), dtype=torch.long), torch.empty(len(rows), dtype=torch.long)
    for k, g in enumerate(groups):
        group_of[g], index_in[g] = k, torch.arange(len(g))
    q_group = group_of[at.rows.cpu()]
    picked, order = [], []
    for k, h in enumerate(hs):
        q = (q_group == k).nonzero()[:, 0]
        picked.append(h[index_in[at.rows.cpu()[q]].to(dev), at.pos.cpu()[q].to(dev)])
        order.append(q)
    h = torch.cat(picked)[torch.argsort(torch.cat(order)).to(dev)]  # back in the order of ``at``
    h = model.get_submodule(arch_of(model).final_norm)(h)
    return logits_of(model, h), None
