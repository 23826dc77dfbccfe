"""Forward hooks: read a module's input, or change a module's output, for one block of code."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def capture_inputs(modules: dict[int, nn.Module]):
    """Record the first positional input of each module (e.g. W's input: the keys) per forward."""
    return _capture(modules, inputs=True)


def capture_outputs(modules: dict[int, nn.Module]):
    """Record each module's output hidden states (decoder blocks may return a tuple)."""
    return _capture(modules, inputs=False)


@contextmanager
def _capture(modules: dict[int, nn.Module], inputs: bool) -> Iterator[dict[int, list[torch.Tensor]]]:
    seen: dict[int, list[torch.Tensor]] = {k: [] for k in modules}
    if inputs:
        handles = [m.register_forward_pre_hook(lambda _m, args, k=k: seen[k].append(args[0].detach()))
                   for k, m in modules.items()]
    else:
        handles = [m.register_forward_hook(lambda _m, _a, out, k=k: seen[k].append(_hidden(out).detach()))
                   for k, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s output hidden states h by ``fn(h)`` (autograd flows through fn)."""

    def hook(_m, _a, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + out[1:]
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
