"""Where a prefix can go in an encoder-decoder model, and the hook that gives encoder self-attention one.

Sites (`PrefixTuningConfig.prefix_sites`):

- `decoder_self`: the decoder's self-attention (Hugging Face PEFT's prefix tuning; in decoder-only and
  encoder-only models, the self-attention of their one stack). Its prefix is put in the decoder cache.
- `cross`: the decoder's cross-attention. Its prefix is put in the cross-attention half of the decoder
  cache, so the attention concatenates [prefix; encoder states] and, in `generate()`, keeps that for
  later steps; the decoder's encoder mask grows to match.
- `encoder_self`: the encoder's self-attention. Encoders take no cache (T5's encoder even drops one), so
  the encoder call carries the prefix cache in an extra keyword (`ENCODER_PREFIX`) that the stock layers
  pass down, and a forward pre-hook on each encoder attention module turns it into that module's cache
  argument. Because the prefix travels with the call, recomputation under gradient checkpointing
  sees the same prefix. Relative position biases (T5) give the prefix columns no bias: real tokens keep
  their relative positions and the prefix has no position.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .. import compat
from ..engine.layers import AdapterError

DECODER_SELF, ENCODER_SELF, CROSS = "decoder_self", "encoder_self", "cross"
PREFIX_SITES = (DECODER_SELF, ENCODER_SELF, CROSS)  # also the order of their blocks in the stored tensor
ENCODER_PREFIX = "unipeft_encoder_prefix"  # keyword that carries the encoder prefix cache down to attention


def sites_of(prompt: nn.Module) -> tuple[str, ...]:
    return getattr(prompt, "sites", (DECODER_SELF,))


def attention_modules(stack: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers stack that read a cache (T5Attention, BartAttention, ...)."""
    return [module for module in stack.modules() if compat.attention_reads_cache(module)]


def attention_layers(stack: nn.Module) -> int:
    """How many layers the stack's cache has (distinct `layer_idx` of its attention modules)."""
    return len({module.layer_idx for module in attention_modules(stack)})


_ENCODER_ATTENTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_encoder_attention(encoder: nn.Module, handles: list) -> None:
    """Install, once, the pre-hooks that read `ENCODER_PREFIX` on the encoder's attention modules; their
    handles join `handles`, so removing those removes the hooks."""
    if encoder not in _ENCODER_ATTENTION:
        _ENCODER_ATTENTION[encoder] = attention_modules(encoder)
    for module in _ENCODER_ATTENTION[encoder]:
        if _take_prefix not in module._forward_pre_hooks.values():
            handles.append(module.register_forward_pre_hook(_take_prefix, with_kwargs=True))


def grow_mask(kwargs: dict, key: str, keys_like: torch.Tensor, count: int) -> None:
    """Prepend `count` ones to the 2D padding mask `kwargs[key]` of the keys (None: all ones, shaped like the
    first two dimensions of `keys_like`), so the model builds its mask over [prefix; keys]."""
    mask = kwargs.get(key)
    if mask is None:
        mask = torch.ones(keys_like.shape[:2], dtype=torch.long, device=keys_like.device)
    elif mask.dim() != 2:
        raise AdapterError(
            f"prefix_sites 'encoder_self' and 'cross' need a 2D {key} (batch, length) to extend over the prefix, "
            f"got {mask.dim()}D; pass the padding mask, not a prepared attention mask"
        )
    kwargs[key] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


def _take_prefix(module: nn.Module, args: tuple, kwargs: dict):
    cache = kwargs.pop(ENCODER_PREFIX, None)
    if cache is None:
        return None
    kwargs[compat.cache_keyword(module)] = cache
    if "position_bias" in kwargs:  # T5-style attention
        kwargs["position_bias"] = _unbiased_prefix(module, args, kwargs, cache.get_seq_length(module.layer_idx))
    return args, kwargs


def _unbiased_prefix(module: nn.Module, args: tuple, kwargs: dict, count: int) -> torch.Tensor | None:
    """T5-style relative position bias for [prefix; tokens] keys: zero columns for the prefix, then the bias
    the tokens have without it. The first layer computes it; later layers receive it already extended."""
    bias = kwargs.get("position_bias")
    hidden = args[0] if args else kwargs["hidden_states"]
    length = hidden.shape[1]
    if bias is None:
        bias = compat.relative_position_bias(module, length, hidden.device)
    if bias is None or bias.shape[-1] != length:
        return bias
    return torch.cat([bias.new_zeros(*bias.shape[:-1], count), bias], dim=-1)
