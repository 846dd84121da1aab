"""Prefix keys and values in a transformers cache: a frozen cache made of them (training, and the first call of
a sequence), or an empty cache filled with them; prefixes expanded to a call's batch; the cache keyword each
module takes (`compat.cache_keyword`: `cache` from transformers 5.25 on, `past_key_values` before).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import compat
from ..engine.layers import AdapterError
from ..engine.sites import body_of


def frozen_cache(self_prefix, encoder_decoder: bool, cross_prefix=None):
    """Prefixes as (key, value) per layer, or None for a site without one."""
    layers = len(self_prefix or cross_prefix)
    self_cache = compat.frozen_prefix_cache(self_prefix or [(None, None)] * layers)
    if not encoder_decoder:
        return self_cache
    cross_cache = compat.frozen_prefix_cache(cross_prefix or [(None, None)] * layers)
    return compat.encoder_decoder_cache(self_cache, cross_cache, recompute_cross=True)


def fill_cache(cache, self_prefix, cross_prefix=None) -> None:
    """Put the prefixes in an empty cache. A cross-attention layer that holds its prefix but is not marked
    updated gets the encoder keys appended on the first decoder call and reuses [prefix; encoder] after."""
    halves = compat.cache_halves(cache)
    if halves is not None:
        targets = ((halves[0], self_prefix), (halves[1], cross_prefix))
    elif cross_prefix:
        raise AdapterError(
            f"a cross-attention prefix needs an EncoderDecoderCache, got {type(cache).__name__}; pass none and "
            f"the model makes one"
        )
    else:
        targets = ((cache, self_prefix),)
    for target, prefix in targets:
        for layer_idx, (key, value) in enumerate(prefix or ()):
            target.update(key, value, layer_idx)


def expand_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """[1 or b, ...] -> [batch, ...]; a batch k times longer repeats each row k times (beam search)."""
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if rows == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if batch % rows:
        raise AdapterError(f"virtual tokens were made for {rows} rows but the model saw a batch of {batch}")
    return tensor.repeat_interleave(batch // rows, dim=0)


def batched(pairs, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) prefixes expanded to the call's batch and cast to its compute dtype."""
    return [(expand_rows(k, batch).to(dtype), expand_rows(v, batch).to(dtype)) for k, v in pairs]


def take_cache(module: nn.Module, kwargs: dict) -> tuple[str | None, Any]:
    """The module's cache keyword and the cache of this call (moved under that keyword if the caller spelled it
    differently, so the module's deprecation path is never taken)."""
    key = compat.cache_keyword(module)
    cache = compat.call_cache(kwargs)
    for name in compat.CACHE_KEYWORDS:
        kwargs.pop(name, None)
    if key is not None:
        kwargs[key] = cache
    return key, cache


def supports_cache(model: nn.Module) -> bool:
    """Whether the model's attention reads keys/values from a cache (prefix tuning needs it)."""
    module = model.get_decoder() if getattr(model.config, "is_encoder_decoder", False) else body_of(model)
    return compat.cache_keyword(module) is not None
