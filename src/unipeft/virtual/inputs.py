"""Virtual tokens and prefixes, written once for every prompt-based method.

A prompt method adds `t` positions the user never sees: learned input vectors ("tokens": prompt
tuning, P-tuning, IDPG) or learned attention keys/values ("prefix": prefix tuning). We attach one
forward pre-hook and one forward hook to stock transformers modules (never replacing `forward` or
`generate`), and map the user's sequence to the model's internal one at each call:

- decoder-only and encoder-only models: hooks on the body (see `body_of`). On the first call of a
  sequence, the tokens are prepended to the input embeddings (or the prefix is put in the cache); the
  attention mask, position ids and token type ids grow by `t`. Classifiers and feature extractors get
  the body output without the `t` virtual positions, so their outputs align with the user's tokens.
  Language-model heads keep them, as in Hugging Face PEFT, because the last virtual position predicts
  the first real token: their token labels are padded with -100 for the virtual positions. Later
  calls with a cache that already holds the virtual positions only extend the mask and shift
  positions, so `generate()` works with and without cache and with any search.
- encoder-decoder models: tokens are prepended in the encoder (whose output keeps them, for cross
  attention; the decoder's encoder mask grows to match); the prefix goes to decoder self-attention,
  as Hugging Face PEFT does, and optionally to encoder self-attention and cross-attention (see
  `prefix_attention`).
- deep prompts (M-IDPG) also replace the first `t` hidden positions before every later block.

The cache goes under the keyword each module takes (`compat.cache_keyword`: `cache` from transformers 5.25
on, `past_key_values` before). During training the prefix lives in a cache whose `update` never stores, so
gradient checkpointing can recompute a layer without the prefix growing.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from .. import compat
from ..engine.layers import AdapterError, AdapterState
from ..engine.model_parts import ModelPart
from ..engine.sites import blocks_of, body_of
from .call_kwargs import CallKwargs, batch_size, compute_dtype, prepend, sequence_length, shift_positions
from .prefix_cache import batched, expand_rows, fill_cache, frozen_cache, take_cache
from .prefix_attention import (
    CROSS, DECODER_SELF, ENCODER_PREFIX, ENCODER_SELF, grow_mask, hook_encoder_attention, sites_of,
)

TOKENS, PREFIX = "tokens", "prefix"
SIDE = "side"  # read by the method's own adapter layers; never inserted into the input or the cache
PROMPT_ENCODER_KEY = "prompt_encoder."  # checkpoint keys of a prompt's networks
_TAG = "unipeft_virtual_tokens"  # set on a cache whose first positions are virtual


class VirtualInput(ModelPart):
    """What a prompt method supplies: its kind, its length and the tensors to insert."""

    home = "prompt_encoder"  # HF PEFT's name for where prompt methods keep their modules
    kind: str = TOKENS
    num_virtual: int = 0
    per_instance = False  # tokens depend on the input (IDPG): generate() computes them once per call
    deep = False  # tokens for every block (M-IDPG): tokens() returns [1 or B, blocks, t, d]
    shallow_option = ""  # a deep prompt's config setting for one prompt at the input, for error messages
    adapter_state: AdapterState | None = None  # the model's shared state, set when the adapter is added

    def owns(self, key: str) -> bool:
        return "." not in key or key.startswith(PROMPT_ENCODER_KEY)  # prompt_embeddings, prompt_encoder.*

    def attached(self, adapter_model: nn.Module) -> None:
        """The first prompt of a model installs the hooks that insert the active one (`virtual_inputs`)."""
        self.adapter_state = adapter_model.adapter_state
        if getattr(adapter_model, "virtual_inputs", None) is None:
            adapter_model.virtual_inputs = VirtualInputs(adapter_model.model, adapter_model.adapter_state,
                                                         adapter_model.prompt_encoder)

    def detached(self, adapter_model: nn.Module) -> None:
        hooks = getattr(adapter_model, "virtual_inputs", None)
        if hooks is not None and not len(adapter_model.prompt_encoder):
            hooks.remove()
            adapter_model.virtual_inputs = None

    def tokens(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[1 or B, t, d] vectors prepended to the input embeddings (kind TOKENS). A deep prompt gives one
        [t, d] slice per block: the first is prepended, block i's input has its first t positions replaced."""
        raise NotImplementedError

    def prefix(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per attention site ("decoder_self", and in encoder-decoder models optionally "encoder_self" and
        "cross"; see `prefix_attention`), per layer (key, value), each [1, kv_heads, t, head_dim] (kind PREFIX)."""
        raise NotImplementedError


class VirtualInputs:
    """The hooks that insert the active prompt adapter's virtual positions into a model's calls."""

    def __init__(self, model: nn.Module, state: AdapterState, prompts: nn.ModuleDict) -> None:
        self.model = model
        self.state = state
        self.prompts = prompts
        self.pinned: dict[str, torch.Tensor] = {}  # per-input tokens fixed for one generate() call
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.lm_head = not self.encoder_decoder and model.get_output_embeddings() is not None
        self._handles = []
        self._calls: list[int] = []  # per body call: virtual positions to drop from its output
        self._limits: dict[int, int | None] = {}
        self._block_tokens: dict[int, torch.Tensor] = {}  # id(body) -> deep tokens of the call running in it
        self._blocks_hooked: set[int] = set()
        if self.encoder_decoder:
            self._hook(model.get_encoder(), self._before_encoder, self._after_call)
            self._hook(model.get_decoder(), self._before_decoder, self._after_decoder)
        else:
            self._hook(body_of(model), self._before_body, self._after_body)
            if self.lm_head:
                self._hook(model, self._pad_labels, None)

    def _hook(self, module: nn.Module, before, after) -> None:
        names = CallKwargs(module)
        self._handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: ((), before(m, names.to_kwargs(args, kwargs))), with_kwargs=True))
        if after is not None:
            self._handles.append(module.register_forward_hook(after, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._blocks_hooked.clear()

    # ---- which adapter ---------------------------------------------------------------------------
    def active(self) -> tuple[str, VirtualInput] | None:
        state = self.state
        if state.disabled:
            return None
        names = [n for n in state.active if n in self.prompts and self.prompts[n].kind != SIDE]
        if not names:
            return None
        if state.routing is not None:
            raise AdapterError(
                "prompt-based adapters cannot be mixed in one batch (adapter_names): their virtual tokens change "
                "the sequence length; run one adapter per batch"
            )
        return names[0], self.prompts[names[0]]

    def check_generation_room(self, length: int, new_tokens: int) -> None:
        """Before generate() of a decoder-only model: the input, the virtual positions and every token to be
        generated must fit a learned position table, or decoding would fail part-way (deep in the model)."""
        found = None if self.encoder_decoder else self.active()
        limit = compat.position_limit(body_of(self.model)) if found else None
        count = found[1].num_virtual if found else 0
        needed = length + count + new_tokens - 1  # the last token generated is never fed back
        if limit is not None and needed > limit:
            raise AdapterError(
                f"generating {new_tokens} tokens after a {length}-token input and the prompt adapter's {count} virtual "
                f"positions needs {needed} positions, more than the model's {limit}; ask for at most "
                f"{max(0, limit - count - length + 1)} new tokens (max_new_tokens) or shorten the input")

    def _tokens(self, name: str, prompt: VirtualInput, kwargs: dict) -> torch.Tensor:
        return self.pinned[name] if name in self.pinned else prompt.tokens(kwargs)

    # ---- decoder-only and encoder-only bodies --------------------------------------------------
    def _before_body(self, module: nn.Module, kwargs: dict) -> dict:
        found = self.active()
        count = 0
        if found is not None:
            name, prompt = found
            kwargs, count = self._insert(module, name, prompt, kwargs, mask_key="attention_mask",
                                         position_key="position_ids")
        sliced = found is not None and found[1].kind == TOKENS and not self.lm_head
        self._calls.append(count if sliced else 0)
        return kwargs

    def _pad_labels(self, module, kwargs: dict) -> dict:
        found = self.active()
        cache = compat.call_cache(kwargs)
        if found is not None and found[1].kind == TOKENS and (cache is None or not cache.get_seq_length()):
            prepend(kwargs, "labels", found[1].num_virtual, -100)
        return kwargs

    def _after_call(self, module, args, output):
        self._block_tokens.pop(id(module), None)
        return output

    def _after_decoder(self, module, args, output):
        compat.allow_checkpointing_with_cache(module, False)
        return output

    def _after_body(self, module, args, output):
        self._after_call(module, args, output)
        compat.allow_checkpointing_with_cache(module, False)
        count = self._calls.pop() if self._calls else 0
        if not count or output is None:
            return output
        if isinstance(output, tuple):
            return (output[0][:, count:],) + tuple(output[1:])
        output.last_hidden_state = output.last_hidden_state[:, count:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, count:] for h in output.hidden_states)
        return output

    def _insert(self, module, name, prompt, kwargs, mask_key, position_key):
        count = prompt.num_virtual
        cache_key, cache = take_cache(module, kwargs)
        seen = cache.get_seq_length() if cache is not None else 0
        if seen:  # a continuing call: the cache already holds the virtual positions
            if getattr(cache, _TAG, None) != count:
                raise AdapterError(
                    f"the cache was not produced with prompt adapter {name!r} active; start from an empty "
                    f"cache (or none) so its {count} virtual positions are added first"
                )
            prepend(kwargs, mask_key, count, 1)
            shift_positions(kwargs, position_key, count, include_virtual=False)
            return kwargs, 0
        self._check_length(module, kwargs, count)
        if prompt.kind == TOKENS:
            kwargs = self._prepend_tokens(module, name, prompt, kwargs)
            shift_positions(kwargs, position_key, count, include_virtual=True)
            if cache is not None:
                setattr(cache, _TAG, count)
        else:
            kwargs[cache_key] = self._prefix_cache(module, prompt, kwargs, cache)
            shift_positions(kwargs, position_key, count, include_virtual=False)
        prepend(kwargs, mask_key, count, 1)
        return kwargs, count

    def _prepend_tokens(self, module, name, prompt, kwargs) -> dict:
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise AdapterError("prompt-based adapters need input_ids or inputs_embeds")
            embeds = compat.token_embeddings(module)(ids)
        tokens = expand_rows(self._tokens(name, prompt, {"input_ids": ids, **kwargs}), embeds.shape[0])
        if prompt.deep:
            self._hook_blocks(module, prompt)
            self._block_tokens[id(module)] = tokens
            tokens = tokens[:, 0]
        kwargs["inputs_embeds"] = torch.cat([tokens.to(embeds.dtype), embeds], dim=1)
        prepend(kwargs, "token_type_ids", prompt.num_virtual, 0)
        return kwargs

    def _prefix_cache(self, module, prompt, kwargs, cache):
        batch = batch_size(kwargs)
        dtype = compute_dtype(module)
        sites = prompt.prefix()
        self_prefix, cross_prefix = (batched(sites[site], batch, dtype) if site in sites else None
                                     for site in (DECODER_SELF, CROSS))
        use_cache = kwargs.get("use_cache")
        use_cache = getattr(self.model.config, "use_cache", False) if use_cache is None else use_cache
        if cache is None and use_cache and not module.training:
            cache = compat.empty_cache(self.model.config, self.encoder_decoder)
        if cache is None:  # a later call may pass it back with the whole sequence again (generate without cache)
            self._check_checkpointing(module)
            cache = frozen_cache(self_prefix, self.encoder_decoder, cross_prefix)
            compat.allow_checkpointing_with_cache(module, True)
        else:
            fill_cache(cache, self_prefix, cross_prefix)
        setattr(cache, _TAG, prompt.num_virtual)
        return cache

    def _hook_blocks(self, body: nn.Module, prompt: VirtualInput) -> None:
        """Deep prompts: before block i (i >= 1) the first t hidden positions become the prompt's slice i."""
        if body.training and any(getattr(m, "gradient_checkpointing", False) for m in body.modules()):
            # a checkpointed block is recomputed after the call, when its slice is no longer at hand
            raise AdapterError(
                f"a per-layer prompt ({type(prompt).__name__}) cannot train with gradient checkpointing: disable "
                f"gradient checkpointing or use one prompt at the input ({prompt.shallow_option})")
        if id(body) in self._blocks_hooked:
            return
        for index, block in enumerate(blocks_of(self.model, body)[1:], start=1):
            self._handles.append(block.register_forward_pre_hook(
                functools.partial(self._replace_block_input, id(body), index), with_kwargs=True))
        self._blocks_hooked.add(id(body))

    def _replace_block_input(self, body_id: int, index: int, block, args, kwargs):
        tokens = self._block_tokens.get(body_id)
        if tokens is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        count = tokens.shape[2]
        hidden = torch.cat([tokens[:, index].to(hidden.dtype), hidden[:, count:]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _check_checkpointing(self, module: nn.Module) -> None:
        from ..engine.sites import family_of

        family = family_of(self.model)
        if module.training and getattr(module, "gradient_checkpointing", False) and family and not family.checkpointing_keeps_cache:
            raise AdapterError(
                f"{type(module).__name__} passes no cache to its layers under gradient checkpointing, so "
                f"the prefix would be dropped; disable gradient checkpointing for prefix tuning on this model, "
                f"or use prompt tuning / P-tuning"
            )

    def _check_length(self, module: nn.Module, kwargs: dict, count: int) -> None:
        """Refuse inputs that no longer fit a learned position table once the virtual tokens are added."""
        key = id(module)
        if key not in self._limits:
            self._limits[key] = compat.position_limit(module)
        limit = self._limits[key]
        length = sequence_length(kwargs)
        if limit is not None and length is not None and length + count > limit:
            raise AdapterError(
                f"the input has {length} tokens and the prompt adapter adds {count} virtual positions, more than the "
                f"model's {limit} positions; truncate inputs to at most {limit - count} tokens"
            )

    # ---- encoder-decoder -------------------------------------------------------------------------
    def _before_encoder(self, module, kwargs: dict) -> dict:
        found = self.active()
        if found is None:
            return kwargs
        name, prompt = found
        if prompt.kind == TOKENS:
            self._check_length(module, kwargs, prompt.num_virtual)
            kwargs = self._prepend_tokens(module, name, prompt, kwargs)
            prepend(kwargs, "attention_mask", prompt.num_virtual, 1)
        elif ENCODER_SELF in sites_of(prompt):
            hook_encoder_attention(module, self._handles)
            prefix = batched(prompt.prefix()[ENCODER_SELF], batch_size(kwargs), compute_dtype(module))
            ids = kwargs.get("input_ids")
            grow_mask(kwargs, "attention_mask", ids if ids is not None else kwargs.get("inputs_embeds"), prompt.num_virtual)
            kwargs[ENCODER_PREFIX] = frozen_cache(prefix, encoder_decoder=False)
        return kwargs

    def _before_decoder(self, module, kwargs: dict) -> dict:
        found = self.active()
        if found is None:
            return kwargs
        name, prompt = found
        if prompt.kind == TOKENS:
            mask, states = kwargs.get("encoder_attention_mask"), kwargs.get("encoder_hidden_states")
            if mask is not None and states is not None and states.shape[1] == mask.shape[1] + prompt.num_virtual:
                prepend(kwargs, "encoder_attention_mask", prompt.num_virtual, 1)
            return kwargs
        sites = sites_of(prompt)
        if CROSS in sites and kwargs.get("encoder_hidden_states") is not None:
            grow_mask(kwargs, "encoder_attention_mask", kwargs["encoder_hidden_states"], prompt.num_virtual)
        if DECODER_SELF in sites:
            kwargs, _ = self._insert(module, name, prompt, kwargs, mask_key="attention_mask",
                                     position_key="position_ids")
        elif CROSS in sites:  # only the cross-attention cache holds virtual positions: decoder mask and positions stay
            cache_key, cache = take_cache(module, kwargs)
            if cache is None or not cache.get_seq_length():
                kwargs[cache_key] = self._prefix_cache(module, prompt, kwargs, cache)
            elif getattr(cache, _TAG, None) != prompt.num_virtual:
                raise AdapterError(
                    f"the cache was not produced with prefix adapter {name!r} active; start from an empty "
                    f"cache (or none) so its cross-attention prefix is added first"
                )
        return kwargs
