"""Tokenizing prompts, targets and subject positions the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """Right-padded ``prompt + target`` token ids with the target's place in each row."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    prompt_len: torch.Tensor  # (B,) tokens of the prompt (BOS included where the tokenizer adds one)
    target_len: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> PairBatch:
        """The given rows, trimmed to their longest sequence."""
        width = int((self.prompt_len[rows] + self.target_len[rows]).max())
        return PairBatch(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.prompt_len[rows],
            self.target_len[rows],
        )

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, label) for every target token: logits at ``position`` predict ``label``."""
        rows, pos = [], []
        for i, (p, t) in enumerate(zip(self.prompt_len.tolist(), self.target_len.tolist())):
            rows += [i] * t
            pos += range(p - 1, p + t - 1)
        rows_t, pos_t = torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        return rows_t, pos_t, self.input_ids[rows_t, pos_t + 1]


def prepare_tokenizer(tok):
    """Right padding and a pad token (eos where the model defines none): what every scorer here expects."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def encode_pairs(tok, prompts: list[str], targets: list[str]) -> PairBatch:
    """Tokenize ``prompt`` and ``prompt + " " + target`` and split the latter at the prompt.

    The target's ids are what the tokenizer makes of it *after* the prompt (a leading space
    included), which is right for BPE, SentencePiece and word-level tokenizers alike.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    p_ids = tok(list(prompts))["input_ids"]
    full = tok([f"{p} {t}" for p, t in zip(prompts, targets)])["input_ids"]
    rows, p_len, t_len = [], [], []
    for p, f, target in zip(p_ids, full, targets):
        if f[: len(p)] != p:  # the tokenizer merged across the boundary: tokenize the parts apart
            f = p + tok(" " + target, add_special_tokens=False)["input_ids"]
        if len(f) == len(p):
            raise ValueError(f"target {target!r} tokenizes to nothing")
        rows.append(f)
        p_len.append(len(p))
        t_len.append(len(f) - len(p))
    return PairBatch(*_pad(rows, tok.pad_token_id), torch.tensor(p_len), torch.tensor(t_len))


def encode_texts(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    return _pad(tok(list(texts))["input_ids"], tok.pad_token_id)


def subject_last_positions(tok, texts: list[str], subjects: list[str]) -> torch.Tensor:
    """Index of the last token of ``subject`` (its last occurrence) in each tokenized text."""
    heads = []
    for text, subject in zip(texts, subjects):
        at = text.rfind(subject)
        if at < 0:
            raise ValueError(f"subject {subject!r} not found in {text!r}")
        heads.append(text[: at + len(subject)])
    return torch.tensor([len(ids) - 1 for ids in tok(heads)["input_ids"]])


def _pad(rows: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
