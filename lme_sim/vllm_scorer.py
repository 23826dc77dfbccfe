"""The vLLM evaluator backend: batched teacher-forced scoring and greedy generation on a vLLM
engine that follows the editor through versioned deltas (never a model reload).

* log P(target | prompt): the rows' token ids (tokenized by lme-sim, exactly as the HF backend
  does) go to the engine with ``prompt_logprobs``; each target token's log-prob and rank come back,
  so mean log-prob and teacher-forced token accuracy match :func:`lme_sim.scoring.score_pairs`.
* Weight sync: :meth:`VLLMScorer.apply_deltas` sends only the changed tensors into the worker(s)
  (``LLM.apply_model``) and adds each to the engine's parameter of the same name, sliced for
  tensor-parallel shards and transposed where vLLM stores the matrix the other way round (GPT-2's
  Conv1D); then it resets the prefix cache so no stale KV block is reused. vLLM's CPU build
  repacks linear weights for its GEMM kernels and drops the plain tensor: for those modules the
  scorer keeps the edited matrix itself (read once from the model folder's safetensors, plus the
  deltas), writes it back as the layer's weight and lets the layer's own
  ``process_weights_after_loading`` repack it.

vLLM is optional (installed on GPU machines as the README shows; ``make test-vllm`` builds a venv
with its CPU build) and is imported only here, lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .scoring import PairScorer, TargetScores
from .tokens import PairBatch
from .weights import add_delta


@dataclass
class VLLMOptions:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = True


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMScorer(PairScorer):
    def __init__(self, model_path: str, options: VLLMOptions | None = None):
        o = options or VLLMOptions()
        # deltas travel to the engine's workers as a pickled function; one GPU (or the CPU): one process
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if o.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.model_path = model_path
        self._packed: set[str] | None = None  # parameters the engine holds only in packed form
        self._full: dict[str, torch.Tensor] = {}  # the current value of each packed parameter

        self.llm = LLM(
            model_path,
            tensor_parallel_size=o.tensor_parallel_size,
            gpu_memory_utilization=o.gpu_memory_utilization,
            dtype=o.dtype,
            max_model_len=o.max_model_len,
            enforce_eager=o.enforce_eager,
            skip_tokenizer_init=True,
        )
        self.version = 0

    def score_pairs(self, batch: PairBatch) -> TargetScores:
        from vllm import SamplingParams

        lengths = (batch.prompt_len + batch.target_len).tolist()
        prompts = [{"prompt_token_ids": batch.input_ids[i, :n].tolist()} for i, n in enumerate(lengths)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        n = len(batch)
        total = torch.zeros(n, dtype=torch.float64)
        hits = torch.zeros(n, dtype=torch.float64)
        for i, out in enumerate(outs):
            ids = prompts[i]["prompt_token_ids"]
            for pos in range(int(batch.prompt_len[i]), lengths[i]):
                lp = out.prompt_logprobs[pos][ids[pos]]
                total[i] += lp.logprob
                hits[i] += float(lp.rank == 1)
        n_tok = batch.target_len.double()
        return TargetScores(total / n_tok, total, hits / n_tok, batch.target_len)

    def greedy_ids(self, prompt_ids: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        budgets = [max_new_tokens] * len(prompt_ids) if isinstance(max_new_tokens, int) else max_new_tokens
        params = [  # as the HF backend: a fixed number of new tokens per prompt
            SamplingParams(max_tokens=n, temperature=0.0, detokenize=False, ignore_eos=True) for n in budgets
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def apply_deltas(self, deltas: dict[str, torch.Tensor], version: int | None = None) -> int:
        """W += delta in the engine for every changed tensor; returns the new version."""
        if self._packed is None:
            self._packed = set().union(*self.llm.apply_model(_packed_parameters))
        adds, sets = {}, {}
        for name, d in deltas.items():
            d = d.detach().cpu().float()
            if name in self._packed:
                if name not in self._full:
                    self._full[name] = _read_tensor(self.model_path, name).float()
                self._full[name] += d
                sets[name] = self._full[name]
            else:
                adds[name] = d
        self.llm.apply_model(_writer(adds, sets))
        self.llm.reset_prefix_cache()
        self.version = version if version is not None else self.version + 1
        return self.version


def _packed_parameters(model) -> set[str]:
    """Names of weights the engine dropped after packing them (vLLM's CPU GEMM path)."""
    return {n for n, p in model.named_parameters() if p.numel() == 0}


def _writer(adds: dict[str, torch.Tensor], sets: dict[str, torch.Tensor]):
    """A function run on each worker's model: p += delta (``adds``; a 16-bit parameter through a
    float32 master copy kept on the worker's model, as the shards keep one, so that a long stream of
    small deltas does not drift in 16-bit rounding); packed layers get their full new weight
    (``sets``, kept in float32 by the scorer) and repack it."""

    def write(model):
        try:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        except Exception:  # not initialized: a single process
            rank, world = 0, 1
        params = dict(model.named_parameters())
        for name in {**adds, **sets}:
            if name not in params:
                raise KeyError(f"vLLM model has no parameter {name!r} to apply a delta to")
        master = model.__dict__.setdefault("_lme_sim_master", {})  # float32 copies of edited 16-bit weights
        for name, d in adds.items():
            p = params[name]
            add_delta(p.data, _local_shard(d, tuple(p.shape), rank, world), master, name)
        for name, w in sets.items():
            layer = model.get_submodule(name.rsplit(".", 1)[0])
            shape = (layer.output_size_per_partition, layer.input_size_per_partition)
            dtype = params[name].dtype
            layer.weight = torch.nn.Parameter(
                _local_shard(w, shape, rank, world).to(dtype).contiguous(), requires_grad=False
            )
            layer.quant_method.process_weights_after_loading(layer)
        return len(adds) + len(sets)

    return write


def _read_tensor(model_path: str, name: str) -> torch.Tensor:
    """One tensor of a Hugging Face model folder's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(f"{model_path}: no tensor {name!r} in its safetensors files")


def _local_shard(d: torch.Tensor, shape: tuple, rank: int, world: int) -> torch.Tensor:
    """The part of a full delta that this tensor-parallel rank holds (transposed if stored so)."""
    for cand in (d, d.T):
        if tuple(cand.shape) == shape:
            return cand
        for dim in (0, 1):
            if cand.shape[1 - dim] == shape[1 - dim] and cand.shape[dim] == shape[dim] * world:
                return cand.narrow(dim, rank * shape[dim], shape[dim])
    raise ValueError(
        f"delta of shape {tuple(d.shape)} does not fit a parameter of shape {shape} (tp={world})"
    )
