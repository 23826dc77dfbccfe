"""The embedded default model: a tiny GPT-2 trained on a synthetic world until it knows its facts.

A word-level tokenizer (every object is one token; ``[BOS]`` is prepended like Llama's BOS) and
a small GPT-2 are trained with AdamW on "prompt object" sentences, the loss on the object token,
with a one-cycle learning-rate schedule until greedy accuracy over every fact in every phrasing
reaches ``target_accuracy``. The result
is cached on disk keyed by the world's and the training's parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .paths import atomic_dir, cache_root
from .world import World, WorldConfig, get_world_config

log = logging.getLogger(__name__)
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "gpt2"  # gpt2 | llama (head_dim = n_embd / n_head; vLLM's CPU build wants 64)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    lr: float = 1e-3  # peak of a one-cycle schedule over max_epochs (warm-up matters here)
    batch_size: int = 32
    max_epochs: int = 80
    target_accuracy: float = 0.97
    seed: int = 0


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + tuple(world.vocabulary))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _fact_batch(
    world: World, tok: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All training sentences as padded ids, the position predicting the object, the object id."""
    pairs = world.sentences()
    enc = tok([f"{p} {o}" for p, o in pairs], padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    pos = lengths - 2
    obj = enc["input_ids"][torch.arange(len(pairs)), lengths - 1]
    return enc["input_ids"], pos, obj


@torch.no_grad()
def fact_accuracy(model, ids: torch.Tensor, pos: torch.Tensor, obj: torch.Tensor, batch: int = 512) -> float:
    """Greedy accuracy: the argmax after each prompt is the object."""
    model.eval()
    hits = 0
    for s in range(0, len(ids), batch):
        logits = model(input_ids=ids[s : s + batch], attention_mask=(ids[s : s + batch] != 0).long()).logits
        rows = torch.arange(logits.shape[0])
        hits += (logits[rows, pos[s : s + batch]].argmax(-1) == obj[s : s + batch]).sum().item()
    return hits / len(ids)


def train_world_model(world: World, cfg: TrainConfig = TrainConfig(), progress: bool = True):
    """Train a tiny GPT-2 on ``world``; returns (model, tokenizer, stats)."""
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(world)
    ids, pos, obj = _fact_batch(world, tok)
    special = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=max(32, ids.shape[1] + 16),
            tie_word_embeddings=False,
            **special,
        )
        model = LlamaForCausalLM(config)
    elif cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_positions=max(32, ids.shape[1] + 16),
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"TrainConfig.arch must be 'gpt2' or 'llama', not {cfg.arch!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = -(-len(ids) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.max_epochs * steps_per_epoch, pct_start=0.1
    )
    start, acc, epoch = time.time(), 0.0, 0
    bar = tqdm(range(cfg.max_epochs), desc=f"training world {world.config.name!r}", disable=not progress)
    for epoch in bar:
        model.train()
        for b in torch.randperm(len(ids)).split(cfg.batch_size):
            logits = model(input_ids=ids[b], attention_mask=(ids[b] != 0).long()).logits
            loss = torch.nn.functional.cross_entropy(logits[torch.arange(len(b)), pos[b]], obj[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == cfg.max_epochs - 1:
            acc = fact_accuracy(model, ids, pos, obj)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if acc >= cfg.target_accuracy:
                break
    model.eval()
    stats = {
        "accuracy": acc,
        "epochs": epoch + 1,
        "seconds": round(time.time() - start, 1),
        "n_facts": len(world.facts),
        "n_sentences": len(ids),
    }
    if acc < cfg.target_accuracy:
        log.warning("world %s reached only %.3f accuracy in %d epochs", world.config.name, acc, epoch + 1)
    return model, tok, stats


def world_cache_dir(world_cfg: WorldConfig, cfg: TrainConfig) -> Path:
    train_key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    key = f"{world_cfg.fingerprint()}-{train_key}"
    return cache_root() / "worlds" / f"{world_cfg.name}-{key}"


def load_world_model(
    name_or_config: str | WorldConfig, cfg: TrainConfig = TrainConfig(), progress: bool = True
):
    """(model, tokenizer, world) for a named world, training and caching the model on first use."""
    world_cfg = get_world_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    world = World(world_cfg)
    path = world_cache_dir(world_cfg, cfg)
    if not (path / "stats.json").exists():
        model, tok, stats = train_world_model(world, cfg, progress)
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        log.info("trained world %s: %s", world_cfg.name, stats)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tok, world


def world_stats(name: str, cfg: TrainConfig = TrainConfig()) -> dict:
    return json.loads((world_cache_dir(get_world_config(name), cfg) / "stats.json").read_text())
