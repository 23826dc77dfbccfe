"""Small pieces of running a model block by block, shared by the backbone and the suffix passes."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Positions:
    """(row, position) pairs to read at."""

    rows: torch.Tensor
    pos: torch.Tensor


class PassThrough(nn.Module):
    """Stands in for a block that runs elsewhere (another shard, or a pass computed once before):
    returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _StopForward(Exception):
    """Ends a shard's forward pass after its last block."""


def _replace_input(module: nn.Module, hidden: torch.Tensor, stack: ExitStack) -> None:
    def pre(_m, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    stack.callback(handle.remove)


def _hidden(out) -> torch.Tensor:
    """A block's output hidden states (some blocks return a tuple)."""
    return out[0] if isinstance(out, tuple) else out
