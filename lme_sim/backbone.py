"""What the editing math needs from a model, in one call: a forward pass with a *probe plan*.

A plan says, for one batch of token ids, which activations to read (W's input "keys" or a
block's output "hidden", at given (row, position) pairs, or the second moment of the keys over
every real token), where to add a vector to a block's output (``inject``), which edited
matrices to multiply on their input side by a block-diagonal matrix (``rotate``: W x becomes
W M x, i.e. W' = W M, without forming W M; M given as a :class:`Rotation`), and at which positions
to return next-token logits. :class:`LocalBackbone` runs a plan on an in-process Hugging Face model
with forward hooks; the runtime's sharded backbone runs the same plan over layer-range shards (Ray
actors), so every editor works unchanged on 1 or N shards.

Gradients: if ``inject.values`` or a rotation's ``theta`` requires grad, the returned logits are
differentiable with respect to it (locally by plain autograd; across shards by sending the
gradient back through the shards).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import (
    DEFAULT_MODULE,
    arch_of,
    edit_module_path,
    layer_path,
    layers_of,
    logits_of,
    n_layers,
    weight_view,
)
from .hooks import PassThrough, Positions, _hidden, _replace_input, _StopForward
from .linalg import nullspace_projector, rotate_blocks
from .weights import add_delta, matrix_stats


@dataclass
class Inject:
    """Add ``values[i]`` to the output of block ``layer`` at (rows[i], pos[i])."""

    layer: int
    at: Positions
    values: torch.Tensor


@dataclass
class Rotation:
    """The block-diagonal M = base Q(theta) of :attr:`Plan.rotate`, blocks (n_blocks, b, b) each, Q the
    Cayley transform of theta (:func:`~lme_sim.linalg.cayley`). ``theta`` may require grad (MOSE fits
    it); ``base`` is fixed (the rotation already written). Sent as the two factors, not as M, so that
    a pass over few rows never forms M (:func:`~lme_sim.linalg.rotate_blocks`)."""

    base: torch.Tensor
    theta: torch.Tensor


@dataclass
class Plan:
    keys: dict[int, Positions] = field(default_factory=dict)  # layer -> where to read W's input
    hidden: dict[int, Positions] = field(default_factory=dict)  # layer -> where to read the block output
    key_moments: list[int] = field(default_factory=list)  # layers: sum of k k^T over real tokens
    logits: Positions | None = None
    inject: Inject | None = None
    # layer -> a block-diagonal M (n_blocks * b = d_ff): W's input x becomes M x block by block
    rotate: dict[int, Rotation] = field(default_factory=dict)
    # layer -> where to read W's input (into Output.keys) and to add a zero leaf to W's output
    # (Output.taps): the gradient w.r.t. that leaf is the gradient w.r.t. W's output there.
    # Used through Backbone.keys_and_output_grads (UltraEdit).
    taps: dict[int, Positions] = field(default_factory=dict)
    # the pass may end after this block: nothing after it is read (no logits); None: the whole model
    stop: int | None = None
    # which matrix of each block ``keys``, ``key_moments``, ``taps`` and ``rotate`` read (lme_sim.arch)
    module: str = DEFAULT_MODULE

    def differentiable(self) -> bool:
        return (self.inject is not None and self.inject.values.requires_grad) or any(
            r.theta.requires_grad for r in self.rotate.values()
        )


@dataclass
class Output:
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # (N, d_ff) float32, on CPU
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # (N, d_model)
    # (d_ff, d_ff) float64 sums, on the model's device (Backbone.key_moment_sums hands them over on the CPU)
    key_moments: dict[int, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    logits: torch.Tensor | None = None  # (M, vocab) float32
    taps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d_model) zero leaf (Plan.taps)


class Backbone:
    """Interface used by scoring, keys, targets, covariance and the editors."""

    n_layers: int
    config: object  # the model's transformers config

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Plan) -> Output:
        raise NotImplementedError

    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """W += delta for each parameter named in ``deltas`` (each delta in its parameter's own layout),
        through :func:`lme_sim.weights.add_delta` wherever the parameter lives."""
        raise NotImplementedError

    def edit_weight(self, layer: int, module: str = DEFAULT_MODULE) -> torch.Tensor:
        """A copy of W (``module`` of block ``layer``) in (out, in) orientation, (d_model, d_ff) for the
        default ``down_proj``."""
        raise NotImplementedError

    def edit_param_name(self, layer: int, module: str = DEFAULT_MODULE) -> str:
        raise NotImplementedError

    def weight_stats(self, layer: int, module: str = DEFAULT_MODULE) -> dict[str, float]:
        """Norms and condition number of W at ``layer``, and the norm of its change since the first
        call for that layer (computed where the weight lives: no matrix is shipped)."""
        raise NotImplementedError

    def transposed(self) -> bool:
        """Whether W is stored as (d_ff, d_model) (GPT-2 Conv1D)."""
        raise NotImplementedError

    def key_moment_sums(self, batches, layers: list[int]) -> tuple[dict[int, torch.Tensor], int]:
        """Sum of k k^T over the real tokens of ``batches`` ((input_ids, attention_mask) pairs) per
        layer (float64, on CPU), and the number of tokens. Shards keep the sums where the layer lives."""
        sums: dict[int, torch.Tensor] = {}
        n = 0
        for input_ids, attention_mask in batches:
            out = self.run(input_ids, attention_mask, Plan(key_moments=list(layers), stop=max(layers)))
            n += out.n_tokens
            for l, kk in out.key_moments.items():
                sums[l] = sums[l] + kk if l in sums else kk
        return {l: v.cpu() for l, v in sums.items()}, n

    def nullspace_projector(self, layer: int, C0: torch.Tensor, threshold: float) -> torch.Tensor:
        """AlphaEdit's projector for ``layer`` from its key statistics ``C0`` (shards compute it on the
        device holding the layer)."""
        return nullspace_projector(C0, threshold)

    def save_weights(self, layers: list[int], module: str = DEFAULT_MODULE) -> dict[str, float]:
        """Keep a copy of W (``module``) at ``layers`` where it lives (for :meth:`restore_weights`); returns
        ``{parameter name: ||W||_F}``."""
        raise NotImplementedError

    def keys_and_output_grads(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        at: Positions,
        labels: torch.Tensor,
        layers: list[int],
        module: str = DEFAULT_MODULE,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """One forward and one backward pass. At the (row, pos) pairs ``at``: W's input k per layer
        (N, d_ff), the gradient g of L = sum_i CE(logits at at[i], labels[i]) w.r.t. W's output
        (N, d_model), and the per-position CE (N,). All float32 on the CPU. Nothing below the
        lowest of ``layers`` is differentiated (the weights are frozen, the taps are the only leaves).
        ``module``: which matrix of each block (its input and the gradient w.r.t. its output)."""
        plan = Plan(taps={l: at for l in layers}, logits=at, module=module)
        with _no_param_grads(getattr(self, "model", None)), torch.enable_grad():
            out = self.run(input_ids, attention_mask, plan)
            nll = nn.functional.cross_entropy(out.logits, labels.to(out.logits.device), reduction="none")
            grads = torch.autograd.grad(nll.sum(), [out.taps[l] for l in layers])
        return (
            {l: out.keys[l].float().cpu() for l in layers},
            {l: g.float().cpu() for l, g in zip(layers, grads)},
            nll.detach().float().cpu(),
        )

    def restore_weights(self) -> None:
        """Put back, bit for bit, the weights kept by the last :meth:`save_weights`."""
        raise NotImplementedError

    # Suffix passes (lme_sim.suffix): each target-optimization step runs only what its delta can change.
    def supports_suffix(self) -> bool:
        """Whether :meth:`prefix` / :meth:`suffix_logits` work here (else callers run full passes)."""
        return False

    def prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: torch.Tensor,
        layer: int,
        logits: Positions | None = None,
    ):
        """One pass without gradients that keeps what no vector added to block ``layer``'s output at
        positions ``start`` (B,) can change; returns (a handle for :meth:`suffix_logits`, logits at
        ``logits`` of the unchanged model)."""
        raise NotImplementedError

    def suffix_logits(self, handle, rows: torch.Tensor, values: torch.Tensor, at: Positions) -> torch.Tensor:
        """Logits at ``at`` ((index into ``rows``, position - start) pairs) with ``values[i]`` added to
        block ``layer``'s output at ``start`` of row ``rows[i]``; differentiable w.r.t. ``values``."""
        raise NotImplementedError

    def drop_prefix(self, handle) -> None:
        """Free what :meth:`prefix` kept."""

    # Chunks of independent work (lme_sim.runtime.shards pipelines them across its shards)
    def pipeline_depth(self, blocks: range | None = None) -> int:
        """How many chunks of independent work :meth:`map_chunks` keeps in flight at once, for chunks
        whose passes run mostly ``blocks`` (None: every block): 1 here (one model, one chunk at a
        time); over shard actors, one per shard holding any of ``blocks`` (shard i on chunk k+1 while
        shard i+1 is on chunk k). Callers cut their work with :func:`chunk_size` so that every stage
        has a chunk."""
        return 1

    def map_chunks(self, fn, chunks, blocks: range | None = None) -> list:
        """``[fn(c) for c in chunks]``, for chunks of independent work (no chunk reads what another
        computes) whose passes run mostly ``blocks``: a pipelined backbone runs them concurrently.
        Results in the order of ``chunks``."""
        return [fn(c) for c in chunks]


def chunk_size(n: int, per: int, depth: int) -> int:
    """Items per chunk for ``n`` independent items that may go at most ``per`` at a time through a
    backbone of :meth:`~Backbone.pipeline_depth` ``depth``: ``per`` at depth 1 (the chunks run in turn:
    the fewer the better); deeper, the chunks are evened out and made a multiple of ``depth`` in
    number, so that no stage of the pipeline waits for want of a chunk (10 requests at most 32 at a
    time through 2 shards: 2 chunks of 5, not 1 of 10)."""
    if depth <= 1 or n <= 1:
        return per
    n_chunks = -(-n // per)
    n_chunks = -(-n_chunks // depth) * depth
    return max(1, -(-n // n_chunks))


class LocalBackbone(Backbone):
    """A plan run on an in-process Hugging Face causal LM (hooks on the blocks and on W)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.n_layers = n_layers(model)
        self._base: dict[tuple[int, str], torch.Tensor] = {}
        self._master: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}

    def run(self, input_ids, attention_mask, plan: Plan) -> Output:
        return run_plan(self.model, input_ids, attention_mask, plan)[0]

    def apply_deltas(self, deltas):
        add_deltas(self.model, deltas, self._master)

    def edit_weight(self, layer, module=DEFAULT_MODULE):
        return weight_view(self.model, layer, module).detach().clone()

    def edit_param_name(self, layer, module=DEFAULT_MODULE):
        return f"{edit_module_path(self.model, layer, module)}.weight"

    def weight_stats(self, layer, module=DEFAULT_MODULE):
        return weight_health(self.model, layer, self._base, module)

    def transposed(self):
        return arch_of(self.model).transposed

    def save_weights(self, layers, module=DEFAULT_MODULE):
        return save_weights(self.model, layers, self._saved, module)

    def restore_weights(self):
        restore_weights(self.model, self._saved)

    def nullspace_projector(self, layer, C0, threshold):
        """On the model's device, as a shard computes it (a GPU's eigh); returned on the CPU."""
        return nullspace_projector(C0.to(self.model.device), threshold).cpu()

    def supports_suffix(self):
        from .suffix import supports_suffix

        return supports_suffix(self.model)

    def prefix(self, input_ids, attention_mask, start, layer, logits=None):
        from .suffix import prefix_pass

        pc, out, _ = prefix_pass(self.model, input_ids, attention_mask, start, layer, logits=logits)
        return pc, out

    def suffix_logits(self, handle, rows, values, at):
        from .suffix import suffix_pass

        return suffix_pass(self.model, handle, rows, values, at)[0]


def save_weights(
    model: nn.Module, layers, saved: dict[str, torch.Tensor], module: str = DEFAULT_MODULE
) -> dict[str, float]:
    """Copies of W (``module``) at ``layers`` into ``saved`` (replacing what it held); returns their
    Frobenius norms."""
    params = dict(model.named_parameters())
    saved.clear()
    for layer in layers:
        name = f"{edit_module_path(model, layer, module)}.weight"
        saved[name] = params[name].detach().clone()
    return {name: float(w.double().norm()) for name, w in saved.items()}


def restore_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy the tensors kept by :func:`save_weights` back into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in saved.items():
            params[name].copy_(w)


def add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], masters: dict[str, torch.Tensor]) -> None:
    """:func:`lme_sim.weights.add_delta` for every named parameter of ``model`` in ``deltas``."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        add_delta(params[name], delta, masters, name)


def weight_health(model: nn.Module, layer: int, base: dict, module: str = DEFAULT_MODULE) -> dict[str, float]:
    """:func:`~lme_sim.weights.matrix_stats` of W (``module`` of block ``layer``) plus ``cum_delta_norm``
    against ``base[(layer, module)]`` (recorded on the first call)."""
    W = weight_view(model, layer, module).detach().float()
    start = base.setdefault((layer, module), W.clone())
    return {**matrix_stats(W), "cum_delta_norm": float((W - start).norm())}


class _no_param_grads:
    """No parameter of ``model`` (if any) requires grad inside the block; flags restored after."""

    def __init__(self, model):
        params = model.parameters() if isinstance(model, nn.Module) else []
        self.flags = [(p, p.requires_grad) for p in params]

    def __enter__(self):
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in self.flags:
            p.requires_grad_(f)


def as_backbone(model_or_backbone) -> Backbone:
    return model_or_backbone if isinstance(model_or_backbone, Backbone) else LocalBackbone(model_or_backbone)


def run_plan(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: Plan,
    hidden_in: torch.Tensor | None = None,
    layers: range | None = None,
):
    """Run ``plan`` on ``model``; the parts of it on blocks outside ``layers`` are left to others.

    With ``hidden_in`` the first block of ``layers`` takes it as its input instead of what came
    before (how a shard continues another shard's forward pass). Returns an :class:`Output` and,
    when ``layers`` ends before the last block, the hidden state after the last block of ``layers``.
    """
    dev = model.device
    layers = layers if layers is not None else range(n_layers(model))
    if plan.stop is not None and layers.start <= plan.stop < layers.stop - 1:
        if plan.logits is not None:
            raise ValueError("a plan that reads logits cannot stop before the last block")
        layers = range(layers.start, plan.stop + 1)  # blocks after ``stop`` cannot change what is read
    last = layers.stop == n_layers(model)
    out = Output()
    mask = attention_mask.to(dev)
    with ExitStack() as stack:

        def hook(module, fn, pre=False):
            handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
            stack.callback(handle.remove)

        def block(l):
            return model.get_submodule(layer_path(model, l))

        if hidden_in is not None:
            _replace_input(block(layers.start), hidden_in.to(dev), stack)
        for l, at in plan.keys.items():
            if l in layers:
                hook(
                    model.get_submodule(edit_module_path(model, l, plan.module)),
                    lambda _m, args, l=l, at=at: out.keys.__setitem__(l, _gather(args[0], at)),
                    pre=True,
                )
        for l in plan.key_moments:
            if l in layers:

                def moment(_m, args, l=l):
                    k = args[0][mask.bool()].float()
                    out.key_moments[l] = (k.T @ k).double()

                hook(model.get_submodule(edit_module_path(model, l, plan.module)), moment, pre=True)
        for l, at in plan.taps.items():
            if l in layers:

                def tap(_m, args, o, l=l, at=at):
                    out.keys[l] = _gather(args[0], at)
                    leaf = torch.zeros(
                        len(at.rows),
                        o.shape[-1],
                        dtype=o.dtype,
                        device=o.device,
                        requires_grad=torch.is_grad_enabled(),
                    )
                    out.taps[l] = leaf
                    return o.index_put((at.rows.to(o.device), at.pos.to(o.device)), leaf, accumulate=True)

                hook(model.get_submodule(edit_module_path(model, l, plan.module)), tap)
        for l, rot in plan.rotate.items():
            if l in layers:
                hook(
                    model.get_submodule(edit_module_path(model, l, plan.module)),
                    lambda _m, args, r=rot: (rotate_input(args[0], r),) + tuple(args[1:]),
                    pre=True,
                )
        if plan.inject is not None and plan.inject.layer in layers:
            inj = plan.inject

            def add(_m, _a, o):
                h = _hidden(o)
                h = h.index_put(
                    (inj.at.rows.to(dev), inj.at.pos.to(dev)),
                    inj.values.to(h.device, h.dtype),
                    accumulate=True,
                )
                return (h,) + o[1:] if isinstance(o, tuple) else h

            hook(block(inj.layer), add)
        for l, at in plan.hidden.items():
            if l in layers:
                hook(
                    block(l), lambda _m, _a, o, l=l, at=at: out.hidden.__setitem__(l, _gather(_hidden(o), at))
                )
        boundary: list[torch.Tensor] = []
        if not last:

            def halt(_m, _a, o):
                boundary.append(_hidden(o))
                raise _StopForward

            hook(block(layers.stop - 1), halt)
        try:
            result = model.base_model(input_ids=input_ids.to(dev), attention_mask=mask)
        except _StopForward:
            result = None
    out.n_tokens = int(attention_mask.sum())
    if result is not None and plan.logits is not None:
        h = result.last_hidden_state[plan.logits.rows.to(dev), plan.logits.pos.to(dev)]
        out.logits = logits_of(model, h)
    return out, (boundary[0] if boundary else None)


def input_of_block(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int):
    """(rows, tokens, d_model) input of block ``start`` (the output of the blocks below it); None for
    block 0. For passes that change nothing below ``start`` (:func:`starting_at`)."""
    if start == 0:
        return None
    with torch.no_grad():
        return run_plan(model, input_ids, attention_mask, Plan(stop=start - 1), layers=range(start))[1]


@contextmanager
def starting_at(model: nn.Module, start: int, hidden: torch.Tensor | None):
    """Inside, a forward pass runs blocks ``start``.. only: block ``start`` takes ``hidden`` (from
    :func:`input_of_block` on the same ids and mask) as its input and the blocks below are
    :class:`~lme_sim.hooks.PassThrough`. Equal to the whole pass when nothing below ``start`` changed
    since ``hidden`` was computed."""
    if hidden is None:
        yield
        return
    blocks = layers_of(model)
    below = [blocks[i] for i in range(start)]
    try:
        with ExitStack() as stack:
            for i in range(start):
                blocks[i] = PassThrough()
            _replace_input(blocks[start], hidden, stack)
            yield
    finally:
        for i, b in enumerate(below):
            blocks[i] = b


def rotate_input(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """M x for every row x of ``x`` (..., d_ff), M the block-diagonal :class:`Rotation`."""
    return rotate_blocks(x, rot.base.to(x.device), rot.theta.to(x.device))


def _gather(t: torch.Tensor, at: Positions) -> torch.Tensor:
    return t[at.rows.to(t.device), at.pos.to(t.device)].float()
