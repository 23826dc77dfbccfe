"""Training RLEdit / HiEdit networks over sequences of edits (RLEdit arXiv 2502.05759, sec. 3;
HiEdit arXiv 2604.11214).

A rollout is a sequence of ``rollout_batches`` edit batches drawn from a training split that is
disjoint from evaluation. At step t the hypernetwork proposes deltas from the batch's keys and
gradients on the current model W_{t-1}; the step's loss (the negative reward) is

    sum_{i=0..lookback} mu^i * NLL(paraphrases and prompts of batch t-i | W_{t-1} + Delta_t)
    + locality * KL(P_{W_{t-1}} || P_{W_{t-1} + Delta_t})   on unrelated prompts
    + reg * sum_l ||Delta_t,l||_F^2                           (the published code's L2 term)

differentiated through the ridge solve into the networks (in RLEdit's published code the L2 term
carries no gradient, and HiEdit's router gets none of the reward: docs/methods.md, "HiEdit's and
RLEdit's published training, as the code runs it"); then Delta_t is written (detached) and the
next step starts from it. Gradients of a rollout are summed and applied in one optimizer step, or in
one per ``steps_per_update`` steps: no gradient crosses a written delta, so the parts add up to the
rollout's gradient (taken at the networks of their own part).

HiEdit (hierarchical: a high-level router over a low-level hypernetwork) starts from a trained
RLEdit network for the same model and modules: the low-level policy first learns to edit with
every candidate, then router and hypernetwork train together with the mask, at the lower
``router_phase_lr`` so that the hypernetwork stays near the RLEdit one while the router learns.
At the hand-over each module's step size is multiplied by ``handover_scale`` (default
n_candidates / top_k, since every edit's value shift is now written into top_k modules instead of
all of them; 1 keeps the RLEdit step sizes, for a start whose steps are already as large as the
model bears). The router picks
``top_k`` modules per edit (Gumbel top-k while training, to explore), with an optional penalty on
uneven module usage (``balance``) that keeps it from settling on one subset for every edit. It
learns from two signals that really reach its parameters: the straight-through gradient of the
step loss through the 0/1 mask (dL/dmask_l = <grad_W L, Delta_l> summed over the edit's tokens),
and REINFORCE with each edit's intrinsic reward A_e = c_e(edit all candidates) - c_e(selected
subset), where c_e is the edit's own NLL on its prompt and paraphrases plus ``router_locality``
times the mean KL(before || after) on its neighborhood prompts.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..arch import arch_of, weight_view
from ..backbone import LocalBackbone, Positions, input_of_block, starting_at
from ..cases import EditCase
from ..paths import cache_root
from ..scoring import logits_at
from ..tokens import encode_pairs, encode_texts
from .base import apply_layer_delta
from .checkpoints import load_checkpoint, model_fingerprint, save_checkpoint
from .edit_signals import keys_and_grads, per_row_nll, weight_offsets
from .hypernet import HyperNet, RLEditHParams, Router, Routing, plan_deltas
from .registry import editor_class
from .targets import frozen

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The deltas written in a rollout broke the model (non-finite activations)."""


def training_cases(
    model_name: str, world, data_path: str | None, holdout: int
) -> tuple[list[list[EditCase]], list[str]]:
    """(edit cases to train on, grouped by fact; unrelated prompts for the locality term), disjoint
    from evaluation: the world's train split (its eval split is held out), each fact edited toward
    every other object of its relation; or every record of a dataset file (a separate training
    split, such as CounterFact's ``counterfact-train.json``) after its first ``holdout`` (default 0:
    set it to train on the rest of a file whose first records are evaluated)."""
    if data_path is None:
        if world is None:
            raise ValueError(f"model {model_name!r} has no embedded world: pass a dataset with --data")
        facts = world.split_facts("train")
        groups = [
            [world.case(f, o, among=facts) for o in world.objects[f.relation] if o != f.obj] for f in facts
        ]
        return groups, [world.prompt(f) for f in facts]
    from ..data import load_cases

    cases = load_cases(data_path)[holdout:]
    if len(cases) < 20:
        raise ValueError(
            f"{data_path}: {len(cases)} records after the first {holdout} held out (holdout); "
            "need at least 20 to train on"
        )
    return [[c] for c in cases], [p for c in cases for p, _ in c.neighborhood] or [c.prompt for c in cases]


def _probe_batch(tok, cases: list[EditCase]):
    """Every case's prompt and paraphrases with its new object; and the case of each row."""
    prompts, targets, owner = [], [], []
    for i, c in enumerate(cases):
        for p in (c.prompt, *c.paraphrases):
            prompts.append(p)
            targets.append(c.target_new)
            owner.append(i)
    return encode_pairs(tok, prompts, targets), torch.tensor(owner)


@dataclass
class _Batch:
    """Rows that a rollout runs at several steps, and the input of its lowest edited block for them:
    no delta changes the blocks below it, so they run once per rollout, not at every pass."""

    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None  # (rows, tokens, d_model) input of block ``start``
    start: int
    pairs: object = None  # the PairBatch of prompt + target rows, when the rows are pairs
    owner: torch.Tensor | None = None  # (rows,) the edit each row belongs to

    @classmethod
    def of(cls, model, start: int, pairs=None, texts=None, owner=None) -> _Batch:
        ids, mask = (pairs.input_ids, pairs.attention_mask) if pairs is not None else texts
        return cls(ids, mask, input_of_block(model, ids, mask, start), start, pairs, owner)

    def running(self, model):
        """Inside, the model's passes on these rows start at block ``start``."""
        return starting_at(model, self.start, self.hidden)

    def select(self, rows: torch.Tensor) -> _Batch:
        """The given rows (of a batch of pairs), trimmed to their longest one."""
        pairs = self.pairs.select(rows)
        width = pairs.input_ids.shape[1]
        hidden = None if self.hidden is None else self.hidden[rows, :width]
        return _Batch(pairs.input_ids, pairs.attention_mask, hidden, self.start, pairs)


def _first_rows(owner: torch.Tensor) -> torch.Tensor:
    """Index of each owner's first row (owners numbered 0.. in row order)."""
    return torch.cat([torch.tensor([0]), torch.nonzero(owner[1:] != owner[:-1]).flatten() + 1])


@dataclass
class _Rollout:
    """One rollout's rows, prepared once: per step t, the edits' own prompt + target rows (keys and
    gradients), the probe rows of the look-back loss, and (HiEdit) the edits' neighborhood prompts;
    and the unrelated prompts of the locality term, the same at every step."""

    edits: list[_Batch]
    probes: list[_Batch]
    neighbors: list[_Batch | None]
    unrelated: _Batch

    @classmethod
    def prepare(cls, model, tok, batches, loc_prompts: list[str], start: int, neighbors: int) -> _Rollout:
        """``neighbors``: how many neighborhood prompts of each edit the router's reward reads (0: none)."""

        def nbr(b):
            near = [c.neighborhood[:neighbors] for c in b]
            owner = torch.tensor([i for i, n in enumerate(near) for _ in n], dtype=torch.long)
            if not neighbors or not len(owner):
                return None
            texts = encode_texts(tok, [p for n in near for p, _ in n])
            return _Batch.of(model, start, texts=texts, owner=owner)

        edits, probes = [], []
        for b in batches:
            pairs, owner = _probe_batch(tok, b)
            p = _Batch.of(model, start, pairs, owner=owner)
            probes.append(p)
            edits.append(p.select(_first_rows(owner)))  # each edit's own prompt + target
        unrelated = _Batch.of(model, start, texts=encode_texts(tok, loc_prompts))
        return cls(edits, probes, [nbr(b) for b in batches], unrelated)


def _per_case_mean(rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) mean of each case's rows (NLLs, KLs)."""
    total = torch.zeros(n).index_add(0, owner, rows)
    return total / torch.bincount(owner, minlength=n).clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class TrainingJob:
    """What a learned editor's networks are trained for and on: the method and its hyperparameters,
    the model (with its tokenizer, name and embedded world, if any), and the data: the world's train
    split, else ``data_path``, else ``hp``'s training file (``train_data`` or ``train_source``)."""

    method: str
    hp: RLEditHParams
    model: nn.Module
    tok: object
    model_name: str
    world: object = None
    data_path: str | None = None
    progress: bool = True

    def start(self) -> TrainingJob | None:
        """The job of the networks this method's training starts from (HiEdit: RLEdit's, with its
        RLEdit hyperparameters, on the same data); None for a method that starts from scratch.
        What a method starts from is its class's (``starts_from``, ``start_hparams``)."""
        cls = editor_class(self.method)
        if cls.starts_from is None:
            return None
        return replace(self, method=cls.starts_from, hp=cls.start_hparams(self.hp))


def train_editor(
    job: TrainingJob, *, init: dict | None = None, snapshot_every: int = 0, on_snapshot=None
) -> dict:
    """Train the networks of ``job.method`` on ``job.model``; returns the checkpoint dict. The
    model's weights are the same afterwards. A method that starts from another's networks (HiEdit:
    an RLEdit checkpoint for this model and these layers) starts from ``init``, trained here first
    when None (:meth:`TrainingJob.start`). Before the first rollout and every ``snapshot_every``
    rollouts (0: never) ``on_snapshot(rollouts, checkpoint)`` receives the networks as they are then
    (a budget curve)."""
    method, hp, model, tok, model_name = job.method, job.hp, job.model, job.tok, job.model_name
    world, cls = job.world, editor_class(job.method)
    data_path = job.data_path or (None if world is not None else hp.training_file())
    if init is None and (start := job.start()) is not None:
        init = train_editor(replace(start, data_path=data_path))
    torch.manual_seed(hp.seed)
    rng = random.Random(hp.seed)
    gen = torch.Generator().manual_seed(hp.seed)
    layers = list(hp.layers)
    groups, loc_prompts = training_cases(model_name, world, data_path, hp.holdout)
    per_rollout = hp.rollout_batches * hp.edits_per_batch
    if len(groups) < hp.edits_per_batch:
        raise ValueError(
            f"{len(groups)} facts to train on; need at least edits_per_batch = {hp.edits_per_batch}"
        )
    d_model, d_ff = weight_view(model, layers[0]).shape
    net_config = dict(
        d_ff=d_ff,
        d_model=d_model,
        n_modules=len(layers),
        rank=hp.rank,
        n_blocks=hp.n_blocks,
        init_lr=hp.init_lr,
        init_lambda=hp.init_lambda,
    )
    net, router, top_k = cls.networks_to_train(hp, net_config, init, model)
    params = list(net.parameters()) + (list(router.parameters()) if router is not None else [])
    opt = torch.optim.Adam(params, lr=cls.train_lr(hp))
    original = {l: weight_view(model, l).detach().clone() for l in layers}
    trainer = _Trainer(model, tok, net, router, top_k, hp, gen)
    # normalizer statistics from the unedited model over (a sample of) the training edits
    warm = [rng.choice(g) for g in rng.sample(groups, min(len(groups), 200))]
    sig = keys_and_grads(
        model, encode_pairs(tok, [c.prompt for c in warm], [c.target_new for c in warm]), layers
    )
    net.key_norm.update(torch.cat([sig.keys[l] for l in layers]))
    net.grad_norm.update(torch.cat([sig.grads[l] for l in layers]))
    history = []
    t0 = time.perf_counter()

    def checkpoint() -> dict:
        """The networks as they are now, with what trained them."""
        changed = None
        if router is not None:
            changed = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(router.parameters(), router0))
        return {
            "method": method,
            "model": model_name,
            "fingerprint": model_fingerprint(model),
            "arch": arch_of(model).layers + "/" + arch_of(model).edit_module,
            "layers": layers,
            "module_names": [LocalBackbone(model).edit_param_name(l) for l in layers],
            "net_config": net_config,
            "net": {k: v.clone() for k, v in net.state_dict().items()},
            "router": {k: v.clone() for k, v in router.state_dict().items()} if router is not None else None,
            "top_k": top_k,
            "hparams": hp.model_dump(),
            "train": {
                "seconds": time.perf_counter() - t0,
                "rollouts": len(history),
                "edit_loss": list(history),
                "router_param_change": changed,
                "n_facts": len(groups),
            },
            "init": None
            if init is None
            else {"hparams": init["hparams"], "seconds": init["train"]["seconds"]},
        }

    bar = _progress(job.progress, hp.rollouts * hp.rollout_batches, f"training {method} on {model_name}")
    router0 = [p.detach().clone() for p in router.parameters()] if router is not None else None
    if snapshot_every:
        on_snapshot(0, checkpoint())  # the untrained networks: where the curve starts
    try:
        with frozen(model):
            for r in range(hp.rollouts):
                seq = [
                    rng.choice(g) for g in rng.sample(groups, min(per_rollout, len(groups)))
                ]  # distinct facts
                batches = [seq[i : i + hp.edits_per_batch] for i in range(0, len(seq), hp.edits_per_batch)]
                try:
                    losses = trainer.rollout(
                        batches, rng.sample(loc_prompts, min(hp.locality_prompts, len(loc_prompts))), opt, bar
                    )
                except TrainingDiverged as e:
                    raise TrainingDiverged(
                        f"training {method} diverged in rollout {r + 1}: {e}; lower init_lr or train_lr, "
                        "raise reg, or shorten rollout_batches"
                    ) from None
                for l in layers:  # the next rollout starts from the unedited model
                    weight_view(model, l).data.copy_(original[l])
                history.append(sum(losses) / len(losses))
                if snapshot_every and (r + 1) % snapshot_every == 0 and r + 1 < hp.rollouts:
                    on_snapshot(r + 1, checkpoint())
    finally:
        for l in layers:
            weight_view(model, l).data.copy_(original[l])
        bar(None)
    ckpt = checkpoint()
    log.info(
        "trained %s in %.0f s; edit loss %.3f -> %.3f",
        method,
        ckpt["train"]["seconds"],
        history[0],
        history[-1],
    )
    return ckpt


class _NextToken:
    """Next-token log-probabilities at the last position of fixed prompts, and their KL divergence
    from ``before`` (the locality terms)."""

    def __init__(self, model, rows: _Batch):
        self.model, self.rows = model, rows
        self.at = Positions(torch.arange(len(rows.ids)), rows.mask.sum(1) - 1)
        with torch.no_grad():
            self.before = self.logprobs()

    def logprobs(self) -> torch.Tensor:
        with self.rows.running(self.model):
            logits = logits_at(LocalBackbone(self.model), self.rows.ids, self.rows.mask, self.at)
        return torch.log_softmax(logits, -1)

    def kl(self, now: torch.Tensor) -> torch.Tensor:
        """(n_prompts,) KL(before || now), ``now`` from :meth:`logprobs`."""
        return (self.before.exp() * (self.before - now)).sum(-1)


@dataclass
class _Trainer:
    """What every step of every rollout uses: the model, the networks being trained (HiEdit: with its
    router choosing ``top_k`` modules per edit) and the hyperparameters."""

    model: nn.Module
    tok: object
    net: HyperNet
    router: Router | None
    top_k: int | None
    hp: RLEditHParams
    gen: torch.Generator

    def __post_init__(self):
        self.backbone, self.layers = LocalBackbone(self.model), list(self.hp.layers)
        self.start = min(self.layers)  # no delta changes the blocks below: they run once per rollout

    def rollout(
        self, batches, loc_prompts: list[str], opt: torch.optim.Optimizer, on_step=None
    ) -> list[float]:
        """Edit ``batches`` in turn from the current model, adding each step's gradient to the
        networks' and stepping ``opt`` every ``steps_per_update`` steps (0: at the end); returns the
        steps' edit losses (each also to ``on_step``). The deltas stay written."""
        rows = _Rollout.prepare(
            self.model,
            self.tok,
            batches,
            loc_prompts,
            self.start,
            neighbors=self.hp.router_neighbors if self.router is not None and self.hp.router_locality else 0,
        )
        unrelated = _NextToken(self.model, rows.unrelated)
        every = self.hp.steps_per_update or len(batches)
        losses = []
        opt.zero_grad()
        for t in range(len(batches)):
            losses.append(self.step(batches, rows, unrelated, t, scale=1 / every))
            if on_step is not None:
                on_step(losses[-1])
            if (t + 1) % every == 0 or t + 1 == len(batches):
                opt.step()
                opt.zero_grad()
        return losses

    def step(self, batches, rows: _Rollout, unrelated: _NextToken, t: int, scale: float = 1.0) -> float:
        """One edit step of a rollout: deltas for batch t, the look-back loss with them (its gradient,
        times ``scale``, added to the networks'), then the deltas written. ``unrelated.before`` holds
        the locality prompts' next-token distribution on the model before this step (the previous
        step's pass computed it, with the deltas that were then written); it moves on to the edited
        model. Returns the step's edit loss."""
        model, backbone, net, router, top_k, layers, hp = (
            self.model,
            self.backbone,
            self.net,
            self.router,
            self.top_k,
            self.layers,
            self.hp,
        )
        n = len(batches[t])
        with rows.edits[t].running(model):
            sig = keys_and_grads(model, rows.edits[t].pairs, layers)
        if not all(sig.keys[l].isfinite().all() and sig.grads[l].isfinite().all() for l in layers):
            raise TrainingDiverged(
                f"at step {t + 1} of {len(batches)} the edited model's keys or gradients are not finite"
            )
        net.key_norm.update(torch.cat([sig.keys[l] for l in layers]))
        net.grad_norm.update(torch.cat([sig.grads[l] for l in layers]))

        def step_loss(deltas):
            """(loss, look-back edit loss, (n_edits,) edit loss of batch t's own edits, the locality
            prompts' log-probabilities)."""
            per_case = []
            with weight_offsets(model, deltas):
                for i in range(min(hp.lookback, t) + 1):
                    p = rows.probes[t - i]
                    with p.running(model):
                        nll = per_row_nll(model, p.pairs)
                    per_case.append(_per_case_mean(nll, p.owner, len(batches[t - i])))
                now = unrelated.logprobs()
            edit = sum(hp.mu**i * c.mean() for i, c in enumerate(per_case))
            loss = edit + hp.locality * unrelated.kl(now).mean()
            if hp.reg:
                loss = loss + hp.reg * sum(d.pow(2).sum() for d in deltas.values())
            return loss, edit, per_case[0], now

        def own_loss(deltas):
            """(n_edits,) edit loss of batch t's own edits with ``deltas`` written: step_loss's
            per_case[0] alone (no look-back batches, no locality prompts)."""
            p = rows.probes[t]
            with weight_offsets(model, deltas), p.running(model):
                return _per_case_mean(per_row_nll(model, p.pairs), p.owner, n)

        explore = router is not None and hp.explore
        try:
            routing = Routing(
                router=router,
                top_k=top_k,
                sample=explore,
                generator=self.gen,
                fit_others=getattr(hp, "fit_others", True),
                route=getattr(hp, "route", "edit"),
            )
            deltas, sel, log_pi = plan_deltas(net, sig, layers, n, routing)
        except torch.linalg.LinAlgError as e:  # pseudo keys too large for the ridge system
            raise TrainingDiverged(
                f"at step {t + 1} of {len(batches)} the ridge solve failed ({e})"
            ) from None
        loss, edit, own, now = step_loss(deltas)
        if not loss.isfinite():
            raise TrainingDiverged(f"at step {t + 1} of {len(batches)} the step loss is {loss.item()}")
        if router is not None:
            nb = rows.neighbors[t]
            neighbors = _NextToken(model, nb) if nb is not None else None

            def cost(deltas, own_loss):
                """Per edit: its own edit loss + router_locality x the mean KL on its neighborhood prompts."""
                if neighbors is None:
                    return own_loss
                with weight_offsets(model, deltas):
                    kl = neighbors.kl(neighbors.logprobs())
                return own_loss + hp.router_locality * _per_case_mean(kl, nb.owner, n)

            with torch.no_grad():
                all_deltas, _, _ = plan_deltas(net, sig, layers, n)
                advantage = cost(all_deltas, own_loss(all_deltas)) - cost(deltas, own)  # > 0: subset better
            loss = loss - (advantage * log_pi).mean()
            if (
                hp.balance
            ):  # Switch Transformer's usage penalty (arXiv 2101.03961 eq. 4): 1 when usage is even
                share = sel.mean(0) * len(layers) / top_k
                loss = loss + hp.balance * (share**2).mean()
        (loss * scale).backward()
        for l, d in deltas.items():
            apply_layer_delta(backbone, l, d.detach())
        unrelated.before = now.detach()
        return edit.item()


def _progress(enabled: bool, total: int, label: str):
    """A tqdm bar over edit steps (or nothing): ``update(loss)`` after each, ``update(None)`` closes it."""
    if not enabled:
        return lambda loss: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="step")

    def update(loss):
        if loss is None:
            bar.close()
            return
        bar.update(1)
        bar.set_postfix(edit_loss=f"{loss:.3f}")

    return update


def checkpoint_path(method: str, model_name: str, hp: RLEditHParams, model) -> Path:
    """Where the networks of ``method`` for ``model`` and ``hp`` are cached (under ``$LME_SIM_CACHE``):
    keyed by the model's fingerprint, every hyperparameter that shapes or trains them, and the
    training file's content (not its path or name: the same file anywhere finds the same networks;
    ``world:*`` models train on their world's split and have none)."""
    import hashlib
    import json

    from ..catalog import sha256_of
    from ..models import model_kind

    fields = hp.model_dump(exclude={"checkpoint", "rows_per_pass", "train_data", "train_source"})
    file = None if model_kind(model_name).has_world else hp.training_file()
    fields["train_sha256"] = sha256_of(Path(file)) if file is not None else None
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    name = model_name.replace(":", "_").replace("/", "_")
    return cache_root() / "editors" / f"{method}-{name}-{model_fingerprint(model)}-{key}.pt"


def default_checkpoint(job: TrainingJob) -> Path:
    """The cached checkpoint of ``job`` (:func:`checkpoint_path`), trained now if missing: on the
    world's train split for ``world:*`` models, else on ``hp``'s training file (a method that starts from
    another's networks starts from that one's cached checkpoint: :func:`start_networks`). Without
    either, ``editor.hparams.checkpoint`` must name one."""
    method, model_name = job.method, job.model_name
    if job.world is None and job.hp.train_data is None and job.hp.train_source is None:
        raise FileNotFoundError(
            f"{method} on {model_name!r}: set editor.hparams.checkpoint to a checkpoint made by "
            f"`lme-sim train-editor --method {method} --model {model_name}`, or train_data (a file) or "
            "train_source (a dataset) to train on"
        )
    path = checkpoint_path(method, model_name, job.hp, job.model)
    if not path.is_file():
        init = start_networks(job)
        log.info("training %s for %s (cached at %s)", method, model_name, path)
        save_checkpoint(train_editor(replace(job, data_path=None), init=init), path)
    return path


def start_networks(job: TrainingJob) -> dict | None:
    """The cached checkpoint that ``job``'s training starts from (trained and cached first when
    missing); None for a method that starts from scratch."""
    start = job.start()
    if start is None:
        return None
    return load_checkpoint(default_checkpoint(replace(start, data_path=None)), start.method)
