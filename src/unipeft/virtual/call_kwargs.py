"""The keyword arguments of a hooked module call: positional arguments turned into keywords, masks and position
ids grown for the virtual positions, and the call's batch size, length and compute dtype."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..engine.layers import AdapterError


def prepend(kwargs: dict, key: str, count: int, value) -> None:
    tensor = kwargs.get(key)
    if tensor is None or tensor.dim() != 2:
        return
    pad = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    kwargs[key] = torch.cat([pad, tensor], dim=1)


def shift_positions(kwargs: dict, key: str, count: int, include_virtual: bool) -> None:
    """Real tokens move `count` positions on; with include_virtual the virtual ones take 0..count-1."""
    position_ids = kwargs.get(key)
    if position_ids is None:
        return
    shifted = position_ids + count
    if include_virtual:
        virtual = torch.arange(count, dtype=position_ids.dtype, device=position_ids.device)
        shifted = torch.cat([virtual.expand(*position_ids.shape[:-1], count), shifted], dim=-1)
    kwargs[key] = shifted


class CallKwargs:
    """Positional arguments of a module call turned into keywords, and back."""

    def __init__(self, module: nn.Module):
        self.signature = inspect.signature(module.forward)

    def to_kwargs(self, args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        bound = self.signature.bind_partial(*args, **kwargs)
        out = {}
        for name, value in bound.arguments.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out


def sequence_length(kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[1]
    return None


def batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "hidden_states"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise AdapterError("cannot tell the batch size of this call: pass input_ids or inputs_embeds")


def compute_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
