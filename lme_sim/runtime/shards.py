"""Model shards: contiguous layer ranges of one model, each a plain object (a Ray actor on a cluster).

A shard keeps the whole module tree but replaces the blocks it does not own by pass-throughs, so
Hugging Face still builds masks and position embeddings and the forward code stays
architecture-independent. The first shard embeds the tokens; each next one takes the previous
shard's hidden states as the input of its first block; the last one applies the final norm and
the output head. :class:`ShardedBackbone` runs a probe plan (:mod:`lme_sim.backbone`) across them,
forwarding gradients back through the shards when the plan injects a vector that requires grad,
so the editors give the same results on 1 and N shards.

Pipelining: the editors cut their work into chunks of independent requests and hand them to
:meth:`ShardedBackbone.map_chunks`. Over Ray actors it runs one chunk per shard at once, each on a
thread of the caller that goes through the shards as before: a thread waiting on shard 2 lets another's
call run on shard 1, so shard 1 works on chunk k+1 while shard 2 is on chunk k, forward and backward
(an actor runs its calls in turn; calls on different actors overlap). ``pipeline=False`` runs the
chunks in turn (the reference path).

A shard given a model name loads the weights itself (nothing is shipped through the driver), in
its ``dtype``, drops the blocks it does not own while still on the CPU, and moves only the rest to
its device. Everything it returns is on the CPU; key statistics and projectors of its layers are
computed on its device.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..arch import DEFAULT_MODULE, arch_of, edit_module_path, layers_of, n_layers, weight_view
from ..backbone import (
    Backbone,
    Inject,
    Output,
    Plan,
    Rotation,
    add_deltas,
    restore_weights,
    run_plan,
    save_weights,
    weight_health,
)
from ..hooks import PassThrough
from ..linalg import nullspace_projector
from ..sizing import split_layers  # noqa: F401  (imported from here by the runtime and tests)
from ..suffix import supports_suffix
from ..sysinfo import process_memory
from .devices import placed_device


class ModelShard:
    """Blocks ``layers`` of a model, its deltas, and autograd across shard boundaries."""

    def __init__(self, model: nn.Module | str, layers: range, device: str = "cpu", dtype: str | None = None):
        """``model``: a model or its name (loaded here, on the CPU in ``dtype``); ``dtype``: e.g.
        "bfloat16" (None: as loaded / float32); ``device`` "cuda" in a Ray actor: the GPU Ray gave it."""
        device = placed_device(device)
        if isinstance(model, str):
            from ..models import load_model

            model = load_model(model, dtype=getattr(torch, dtype or "float32"), progress=False).model
        self.layers = layers
        blocks = layers_of(model)
        for i in range(len(blocks)):
            if i not in layers:
                blocks[i] = PassThrough()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None).eval()
        self._base: dict[tuple[int, str], torch.Tensor] = {}  # edited weights as first seen (weight health)
        self._master: dict[str, torch.Tensor] = {}  # float32 copies of edited 16-bit weights
        self._moments: dict[int, torch.Tensor] = {}  # running key statistics (on the device)
        self._saved: dict[str, torch.Tensor] = {}  # weights kept by save_weights (a rejected batch)
        self._graphs: dict[int, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]] = {}
        self._prefixes: dict[int, Any] = {}  # batch key -> lme_sim.suffix.PrefixCache of this shard's blocks

    def info(self) -> dict[str, Any]:
        return {
            "layers": (self.layers.start, self.layers.stop),
            "n_layers": n_layers(self.model),
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "config": self.model.config,
            "transposed": arch_of(self.model).transposed,
            "suffix": supports_suffix(self.model),
            "param_names": {
                (l, m): f"{edit_module_path(self.model, l, m)}.weight"
                for l in self.layers
                for m in arch_of(self.model).modules
            },
        }

    def forward(self, req: int, input_ids, attention_mask, plan: Plan, hidden_in=None, grad: bool = False):
        """Run this shard's part of ``plan``. Returns (Output, hidden states for the next shard or None).

        With ``grad`` the graph is kept under ``req`` for :meth:`backward`; tensors returned are detached.
        """
        leaves: dict = {}  # what this shard differentiates with respect to
        if grad:
            leaves["hidden"] = hidden_in = (
                hidden_in.detach().requires_grad_(True) if hidden_in is not None else None
            )
            inject, rotate = plan.inject, dict(plan.rotate)
            if inject is not None and inject.layer in self.layers:
                inject = Inject(inject.layer, inject.at, inject.values.detach().requires_grad_(True))
                leaves["inject"] = inject.values
            for l, rot in rotate.items():
                if l in self.layers:
                    theta = leaves[("rotate", l)] = rot.theta.detach().requires_grad_(True)
                    rotate[l] = Rotation(rot.base, theta)
            plan = replace(plan, inject=inject, rotate=rotate)
            if plan.taps and min(plan.taps) >= self.layers.start:  # no tap below: the input needs no grad
                leaves["hidden"] = None
        with torch.set_grad_enabled(grad):
            out, boundary = run_plan(self.model, input_ids, attention_mask, plan, hidden_in, self.layers)
        if grad:
            leaves.update({("tap", l): leaf for l, leaf in out.taps.items()})
        out.taps = {}  # the leaves stay here (backward returns their gradients)
        if grad:
            self._graphs[req] = (leaves, out.logits if boundary is None else boundary)
        return _on_cpu(out), (boundary.detach().cpu() if boundary is not None else None)

    @torch.no_grad()
    def accumulate_moments(self, input_ids, attention_mask, layers: list[int], hidden_in=None):
        """Add k k^T over the real tokens to this shard's running sums for the ``layers`` it owns
        (kept on its device: no d_ff x d_ff matrix travels per batch); returns the hidden states for
        the next shard. :meth:`take_moments` hands the sums over."""
        plan = Plan(key_moments=[l for l in layers if l in self.layers])
        out, boundary = run_plan(self.model, input_ids, attention_mask, plan, hidden_in, self.layers)
        for l, kk in out.key_moments.items():
            self._moments[l] = self._moments[l] + kk if l in self._moments else kk
        return boundary.cpu() if boundary is not None else None

    def take_moments(self) -> dict[int, torch.Tensor]:
        sums, self._moments = self._moments, {}
        return {l: v.cpu() for l, v in sums.items()}

    def nullspace_projector(self, C0: torch.Tensor, threshold: float) -> torch.Tensor:
        """AlphaEdit's projector from C0, computed on this shard's device (a GPU's eigh)."""
        return nullspace_projector(C0.to(self.model.device), threshold).cpu()

    def backward(self, req: int, grad_out: torch.Tensor) -> dict:
        """Gradients of this shard's result w.r.t. its leaves: ``"hidden"`` (its input hidden states),
        ``"inject"``, ``("rotate", layer)`` and ``("tap", layer)`` where it owns them (None where unused)."""
        leaves, result = self._graphs.pop(req)
        leaves = {k: v for k, v in leaves.items() if v is not None}
        grads = torch.autograd.grad(
            result, list(leaves.values()), grad_out.to(result.device), allow_unused=True
        )
        return {k: (g.cpu() if g is not None else None) for k, g in zip(leaves, grads)}

    def drop(self, req: int) -> None:
        self._graphs.pop(req, None)

    def held(self) -> dict[str, int]:
        """How many graphs (forwards awaiting their backward) and prefix caches this shard keeps: none
        once an edit is done, pipelined or not (tests/test_pipeline.py)."""
        return {"graphs": len(self._graphs), "prefixes": len(self._prefixes)}

    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """W += delta for parameters this shard owns."""
        add_deltas(self.model, deltas, self._master)

    def prefix(self, key: int, input_ids, attention_mask, start, layer: int, *, logits=None, hidden_in=None):
        """This shard's part of :func:`lme_sim.suffix.prefix_pass`: the cache of the blocks it owns
        stays here under ``key``. Returns (logits or None, hidden states for the next shard or None)."""
        from ..suffix import prefix_pass

        pc, out, boundary = prefix_pass(
            self.model,
            input_ids,
            attention_mask,
            start,
            layer,
            logits=logits,
            layers=self.layers,
            hidden_in=hidden_in,
        )
        if pc.h is not None or pc.kv:
            self._prefixes[key] = pc
        return (out.cpu() if out is not None else None), (boundary.cpu() if boundary is not None else None)

    def suffix_forward(self, req: int, key: int, rows, values, at, *, hidden_in=None, grad: bool = False):
        """This shard's part of :func:`lme_sim.suffix.suffix_pass` on the cache kept under ``key``; with
        ``grad`` the graph is kept under ``req`` for :meth:`backward` (leaves ``"hidden"``, ``"inject"``)."""
        from ..suffix import suffix_pass

        pc, leaves = self._prefixes[key], {}
        if grad:
            if hidden_in is not None:
                hidden_in = leaves["hidden"] = hidden_in.detach().requires_grad_(True)
            if pc.layer in self.layers:
                values = leaves["inject"] = values.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad):
            logits, boundary = suffix_pass(
                self.model, pc, rows, values, at, layers=self.layers, hidden_in=hidden_in
            )
        if grad:
            self._graphs[req] = (leaves, logits if boundary is None else boundary)
        return (logits.detach().cpu() if logits is not None else None), (
            boundary.detach().cpu() if boundary is not None else None
        )

    def drop_prefix(self, key: int) -> None:
        self._prefixes.pop(key, None)

    def edit_weight(self, layer: int, module: str = DEFAULT_MODULE) -> torch.Tensor:
        return weight_view(self.model, layer, module).detach().cpu().clone()

    def weight_stats(self, layer: int, module: str = DEFAULT_MODULE) -> dict[str, float]:
        return weight_health(self.model, layer, self._base, module)

    def save_weights(self, layers: list[int], module: str = DEFAULT_MODULE) -> dict[str, float]:
        """Keep a copy of W (``module``) at those of ``layers`` this shard owns; returns their norms."""
        return save_weights(self.model, [l for l in layers if l in self.layers], self._saved, module)

    def restore_weights(self) -> None:
        restore_weights(self.model, self._saved)

    def memory(self, reset_peak: bool = False) -> dict[str, float]:
        """This actor's resident memory and its high-water mark (:func:`lme_sim.sysinfo.process_memory`)."""
        return process_memory(reset_peak)


def _on_cpu(out: Output) -> Output:
    """``out`` with every tensor detached and on the CPU (what a shard hands to other processes)."""

    def cpu(d):
        return {k: v.detach().cpu() for k, v in d.items()}

    out.keys, out.hidden, out.key_moments = cpu(out.keys), cpu(out.hidden), cpu(out.key_moments)
    out.logits = out.logits.detach().cpu() if out.logits is not None else None
    return out


def is_actor(shard) -> bool:
    """Whether ``shard`` is a Ray actor handle (else a plain object called in this process)."""
    return hasattr(getattr(shard, "forward", None), "remote")


def send(shard, method: str, *args) -> None:
    """Call a method on a plain shard, or on a Ray actor handle without waiting for it."""
    fn = getattr(shard, method)
    fn.remote(*args) if hasattr(fn, "remote") else fn(*args)


class _Graphs:
    """The graphs a differentiable forward left on the shards, for its backward. When the forward's
    autograd node goes away (it holds this object) they are dropped, backward or not: a forward whose
    backward never runs (the last step of a target optimization) would otherwise keep its rows'
    activations on every shard for good, one more per batch."""

    def __init__(self, shards: list, req: int):
        self.shards, self.req, self.used = shards, req, False  # used: the backward took them

    def __del__(self):
        if self.used:
            return
        try:
            for shard in self.shards:
                send(shard, "drop", self.req)
        except Exception:  # interpreter or Ray shutting down: the shards go with it
            pass


def call(shard, method: str, *args, **kwargs):
    """Call a method on a plain shard or on a Ray actor handle (and wait for it)."""
    fn = getattr(shard, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


_in_chunk = threading.local()  # .busy: this thread runs a chunk of ShardedBackbone.map_chunks


class ShardedBackbone(Backbone):
    """A :class:`~lme_sim.backbone.Backbone` over shards (plain objects or Ray actor handles).
    ``pipeline``: chunks of independent work go through the shards as a pipeline (module docstring)."""

    _requests = itertools.count()

    def __init__(self, shards: list, pipeline: bool = True):
        self.shards, self.pipeline = shards, pipeline
        infos = [call(s, "info") for s in shards]
        self.ranges = [range(*i["layers"]) for i in infos]
        self.n_layers = infos[0]["n_layers"]
        if (
            [r.start for r in self.ranges[1:]] != [r.stop for r in self.ranges[:-1]]
            or self.ranges[0].start != 0
            or self.ranges[-1].stop != self.n_layers
        ):
            raise ValueError(f"shards must cover layers 0..{self.n_layers} contiguously, got {self.ranges}")
        self.config = infos[0]["config"]
        self._transposed = infos[0]["transposed"]
        self._param_names = {k: n for i in infos for k, n in i["param_names"].items()}  # (layer, module)
        self._layer_of = {n: l for (l, _), n in self._param_names.items()}
        self._suffix = all(i.get("suffix", False) for i in infos)

    def _owner(self, layer: int) -> int:
        return next(i for i, r in enumerate(self.ranges) if layer in r)

    def pipeline_depth(self, blocks: range | None = None) -> int:
        """One chunk in flight per shard holding any of ``blocks`` (None: every block), where the shards
        are Ray actors and ``pipeline`` is on: a pass that runs on one shard only (the world model's
        target optimization on 2 shards: block 3 alone) has nothing to overlap, and smaller chunks
        would only cost more calls. Else 1: ``pipeline=False`` (the reference path); plain shards (they
        run on the caller's thread, and two threads in one shard's model would see each other's
        hooks); inside a chunk (the outer :meth:`map_chunks` already keeps the shards busy: a chunk's
        own chunks run in turn)."""
        if not self.pipeline or getattr(_in_chunk, "busy", False) or not all(map(is_actor, self.shards)):
            return 1
        blocks = blocks if blocks is not None else range(self.n_layers)
        return max(
            1, sum(1 for r in self.ranges if range(max(r.start, blocks.start), min(r.stop, blocks.stop)))
        )

    def map_chunks(self, fn, chunks, blocks: range | None = None) -> list:
        """``fn`` over ``chunks`` on :meth:`pipeline_depth` threads: each chunk's calls go through the
        shards in order, and the actors overlap the chunks. Every call of a chunk carries its own
        request id, so the chunks' graphs on the shards never mix, and each is dropped as on one
        thread (:class:`_Graphs`)."""
        chunks = list(chunks)
        depth = min(self.pipeline_depth(blocks), len(chunks))
        if depth <= 1:
            return [fn(c) for c in chunks]

        def run(chunk):
            _in_chunk.busy = True
            try:
                return fn(chunk)
            finally:
                _in_chunk.busy = False

        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="lme-pipeline") as pool:
            return list(pool.map(run, chunks))

    def run(self, input_ids, attention_mask, plan: Plan) -> Output:
        if plan.differentiable():
            out = Output()
            rot_layers = sorted(plan.rotate)
            inj = plan.inject.values if plan.inject is not None else None
            out.logits = _ShardedLogits.apply(
                self,
                input_ids,
                attention_mask,
                plan,
                out,
                rot_layers,
                inj,
                *[plan.rotate[l].theta for l in rot_layers],
            )
            return out
        return self._chain(next(self._requests), input_ids, attention_mask, plan, grad_from=None)

    def _chain(self, req, input_ids, attention_mask, plan: Plan, grad_from: int | None) -> Output:
        """``plan`` through the shards in order; each is sent only the rotations of its own layers
        (MOSE's are ~2 MB per layer and step)."""
        merged, hidden = Output(), None
        for i, shard in enumerate(self.shards):
            if plan.stop is not None and self.ranges[i].start > plan.stop:
                break  # nothing after block ``stop`` is read
            grad = grad_from is not None and i >= grad_from
            own = replace(plan, rotate={l: r for l, r in plan.rotate.items() if l in self.ranges[i]})
            out, hidden = call(shard, "forward", req, input_ids, attention_mask, own, hidden, grad)
            merged.keys.update(out.keys)
            merged.hidden.update(out.hidden)
            merged.key_moments.update(out.key_moments)
            merged.n_tokens = out.n_tokens
            merged.logits = out.logits if out.logits is not None else merged.logits
        return merged

    def key_moment_sums(self, batches, layers: list[int]) -> tuple[dict[int, torch.Tensor], int]:
        """The sums stay on the shard owning each layer until the end; shards after the last one
        owning a requested layer are not run. Pipelined, each shard's hidden states go to the next
        shard as a Ray object reference, without waiting: shard 1 reads batch k+1 while shard 2 is on
        batch k (each actor still adds the batches in their order: the same sums)."""
        owners = self.shards[: max(self._owner(l) for l in layers) + 1]
        pipelined = len(owners) > 1 and self.pipeline_depth() > 1
        n, in_flight = 0, []
        for input_ids, attention_mask in batches:
            hidden = None
            for shard in owners:
                args = (input_ids, attention_mask, list(layers), hidden)
                if pipelined:
                    hidden = shard.accumulate_moments.remote(*args)
                else:
                    hidden = call(shard, "accumulate_moments", *args)
            n += int(attention_mask.sum())
            if pipelined:
                import ray

                in_flight.append(hidden)
                if len(in_flight) > len(owners):  # at most one batch per shard ahead of the last one
                    ray.get(in_flight.pop(0))
        return {l: v for shard in owners for l, v in call(shard, "take_moments").items()}, n

    def nullspace_projector(self, layer: int, C0: torch.Tensor, threshold: float) -> torch.Tensor:
        return call(self.shards[self._owner(layer)], "nullspace_projector", C0, threshold)

    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """One call per shard that owns any of the parameters."""
        by_shard: dict[int, dict[str, torch.Tensor]] = {}
        for name, d in deltas.items():
            by_shard.setdefault(self._owner(self._layer_of[name]), {})[name] = d
        for i, part in by_shard.items():
            call(self.shards[i], "apply_deltas", part)

    def edit_weight(self, layer: int, module: str = DEFAULT_MODULE) -> torch.Tensor:
        return call(self.shards[self._owner(layer)], "edit_weight", layer, module)

    def edit_param_name(self, layer: int, module: str = DEFAULT_MODULE) -> str:
        if (layer, module) not in self._param_names:
            known = sorted({m for _, m in self._param_names})
            raise ValueError(
                f"module {module!r}: not an editable matrix of this architecture (it has: {known})"
            )
        return self._param_names[(layer, module)]

    def weight_stats(self, layer: int, module: str = DEFAULT_MODULE) -> dict[str, float]:
        return call(self.shards[self._owner(layer)], "weight_stats", layer, module)

    def save_weights(self, layers: list[int], module: str = DEFAULT_MODULE) -> dict[str, float]:
        # every shard: one that owns none of ``layers`` drops what it kept before
        return {n: w for s in self.shards for n, w in call(s, "save_weights", list(layers), module).items()}

    def restore_weights(self) -> None:
        for shard in self.shards:
            call(shard, "restore_weights")

    def transposed(self) -> bool:
        return self._transposed

    def keys_and_output_grads(self, input_ids, attention_mask, at, labels, layers, module=DEFAULT_MODULE):
        """As :meth:`Backbone.keys_and_output_grads`: the forward runs with grad from the first shard
        owning one of ``layers``, the loss is taken on the logits here, and the backward goes through
        the shards, each returning the gradients of its taps."""
        req = next(self._requests)
        first = min(self._owner(l) for l in layers)
        plan = Plan(taps={l: at for l in layers}, logits=at, module=module)
        try:
            merged = self._chain(req, input_ids, attention_mask, plan, grad_from=first)
            logits = merged.logits.detach().requires_grad_(True)
            with torch.enable_grad():
                nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                (grad,) = torch.autograd.grad(nll.sum(), [logits])
            found: dict = {}
            for i in range(len(self.shards) - 1, first - 1, -1):
                grads = call(self.shards[i], "backward", req, grad)
                grad = grads.pop("hidden", None)
                found.update(grads)
        except BaseException:
            for shard in self.shards[first:]:
                call(shard, "drop", req)
            raise
        return (
            {l: merged.keys[l].float() for l in layers},
            {l: found[("tap", l)].float() for l in layers},
            nll.detach(),
        )

    def supports_suffix(self) -> bool:
        return self._suffix

    def prefix(self, input_ids, attention_mask, start, layer, logits=None):
        """Every shard runs its blocks once; each keeps the cache of the blocks it owns (the owner of
        ``layer`` also keeps that block's output) until :meth:`drop_prefix`."""
        key, hidden, out = next(self._requests), None, None
        for shard in self.shards:
            got, hidden = call(
                shard, "prefix", key, input_ids, attention_mask, start, layer, logits=logits, hidden_in=hidden
            )
            out = got if got is not None else out
        return _Prefix(key, layer), out

    def suffix_logits(self, handle, rows, values, at):
        if values.requires_grad:
            return _ShardedSuffixLogits.apply(self, handle, rows, at, values)
        return self._suffix_chain(next(self._requests), handle, rows, values, at, grad=False)

    def _suffix_chain(self, req, handle, rows, values, at, grad: bool):
        logits, hidden = None, None
        for shard in self.shards[
            self._owner(handle.layer) :
        ]:  # shards before it hold nothing a delta changes
            logits, hidden = call(
                shard, "suffix_forward", req, handle.key, rows, values, at, hidden_in=hidden, grad=grad
            )
        return logits

    def drop_prefix(self, handle) -> None:
        for shard in self.shards:
            call(shard, "drop_prefix", handle.key)


@dataclass(frozen=True)
class _Prefix:
    key: int  # what the shards keep their caches under
    layer: int


class _ShardedSuffixLogits(torch.autograd.Function):
    """Suffix logits (:meth:`ShardedBackbone.suffix_logits`) as a differentiable function of the
    injected vectors, across shards: the gradient goes back from the last shard to block L's owner."""

    @staticmethod
    def forward(ctx, backbone: ShardedBackbone, handle: _Prefix, rows, at, values):
        req = next(backbone._requests)
        logits = backbone._suffix_chain(req, handle, rows, values.detach(), at, grad=True)
        ctx.backbone, ctx.req, ctx.first = backbone, req, backbone._owner(handle.layer)
        ctx.graphs = _Graphs(backbone.shards[ctx.first :], req)
        ctx.meta = (values.dtype, values.device)
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        backbone, grad, found = ctx.backbone, grad_logits.cpu(), None
        ctx.graphs.used = True
        for i in range(len(backbone.shards) - 1, ctx.first - 1, -1):
            grads = call(backbone.shards[i], "backward", ctx.req, grad)
            grad = grads.pop("hidden", None)
            found = grads.get("inject", found)
        return None, None, None, None, found.to(device=ctx.meta[1], dtype=ctx.meta[0])


class _ShardedLogits(torch.autograd.Function):
    """Logits as a differentiable function of the injected vectors and the rotations' parameters
    (``Rotation.theta``), across shards."""

    @staticmethod
    def forward(
        ctx,
        backbone: ShardedBackbone,
        input_ids,
        attention_mask,
        plan: Plan,
        out: Output,
        rot_layers: list[int],
        values,
        *rotations,
    ):
        req = next(backbone._requests)
        layers = rot_layers + ([plan.inject.layer] if plan.inject is not None else [])
        first = min(backbone._owner(l) for l in layers)
        detached = replace(
            plan,
            rotate={l: Rotation(plan.rotate[l].base, t.detach()) for l, t in zip(rot_layers, rotations)},
            inject=None
            if plan.inject is None
            else Inject(plan.inject.layer, plan.inject.at, values.detach()),
        )
        merged = backbone._chain(req, input_ids, attention_mask, detached, grad_from=first)
        out.keys, out.hidden, out.key_moments, out.n_tokens = (
            merged.keys,
            merged.hidden,
            merged.key_moments,
            merged.n_tokens,
        )
        ctx.backbone, ctx.req, ctx.first, ctx.rot_layers = backbone, req, first, rot_layers
        ctx.graphs = _Graphs(backbone.shards[first:], req)
        ctx.meta = [(t.dtype, t.device) if t is not None else None for t in (values, *rotations)]
        return merged.logits

    @staticmethod
    def backward(ctx, grad_logits):
        backbone, grad, found = ctx.backbone, grad_logits.cpu(), {}
        ctx.graphs.used = True
        for i in range(len(backbone.shards) - 1, ctx.first - 1, -1):
            grads = call(backbone.shards[i], "backward", ctx.req, grad)
            grad = grads.pop("hidden", None)
            found.update(grads)
        keys = ["inject"] + [("rotate", l) for l in ctx.rot_layers]
        out = [
            found[k].to(device=m[1], dtype=m[0]) if m is not None and found.get(k) is not None else None
            for k, m in zip(keys, ctx.meta)
        ]
        return (None, None, None, None, None, None, *out)
