"""Every assumption unipeft makes about transformers' internals, one function each.

Nothing else in unipeft reads transformers' private names, cache classes or call signatures: when a release
changes one of them, the function here is the one place to change, and `tests/test_compat.py` has one test per
function that fails naming it. The tested range of transformers releases is `TESTED_TRANSFORMERS`:
`import unipeft` warns once outside it. torch, transformers and `inspect` are imported inside the functions,
so that `import unipeft` stays cheap.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import warnings
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

# The oldest release the whole suite passed on, and the newest minor series it passed on (the lock's).
TESTED_TRANSFORMERS = ("5.15.0", "5.25")

# Newest first: transformers 5.25 renamed `past_key_values` to `cache` (the old name still accepted, with a
# FutureWarning, until 5.40). A module's own spelling is passed, so no deprecation path is ever taken.
CACHE_KEYWORDS = ("cache", "past_key_values")


def installed_transformers() -> str | None:
    """The installed transformers release without importing it (seconds) or importlib.metadata (a tenth of one):
    the `__version__ = "..."` line of its `__init__.py`. None when it is not installed."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as source:
        found = re.search(r"^__version__\s*=\s*[\"']([^\"']+)", source.read(), re.M)
    return found.group(1) if found else None


def untested_transformers(version: str | None = None) -> str | None:
    """The warning for a transformers release (default: the installed one) outside the tested range, or None
    inside it or when transformers is not installed."""
    version = version or installed_transformers()
    if version is None:
        return None
    low, high = TESTED_TRANSFORMERS
    found = _release(version)
    if found is not None and _release(low) <= found and found[:2] <= _release(high)[:2]:
        return None
    major, minor, _ = _release(high)
    return (f"unipeft was tested with transformers {low} to {high}.x and found {version}; prefix and prompt methods "
            f"depend on transformers internals that change between releases: install a release in that range "
            f"(pip install 'transformers>={low},<{major}.{minor + 1}'), or report what fails")


def _release(version: str) -> tuple[int, ...] | None:
    """"5.25.0.dev0" -> (5, 25, 0): the release numbers, padded to three; None for a version without them."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    if found is None:
        return None
    numbers = [int(n) for n in found.group().split(".")]
    return tuple(numbers + [0] * (3 - len(numbers)))


def warn_if_untested() -> None:
    """One UserWarning naming the tested range when the installed transformers is outside it."""
    message = untested_transformers()
    if message:
        warnings.warn(message, UserWarning, stacklevel=3)


# ---- call signatures ---------------------------------------------------------------------------------------------
_KEYWORD_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_keyword(module: nn.Module) -> str | None:
    """The keyword under which `module.forward` takes the key/value cache ("cache" or "past_key_values"), or None
    when it takes none (DeBERTa's attention). Read from the signature once per module."""
    if module not in _KEYWORD_OF:
        import inspect

        parameters = inspect.signature(module.forward).parameters
        _KEYWORD_OF[module] = next((name for name in CACHE_KEYWORDS if name in parameters), None)
    return _KEYWORD_OF[module]


def call_cache(kwargs: dict) -> Any:
    """The cache a call was given, under whichever keyword the caller used."""
    return next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model output carries (its field is `cache` from 5.25 on, `past_key_values` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return next((getattr(output, name) for name in CACHE_KEYWORDS if name in fields), None)


def attention_reads_cache(module: nn.Module) -> bool:
    """Whether `module` is an attention module of an encoder-decoder stack that reads a cache: it takes a cache
    keyword and `key_value_states`, and knows its `layer_idx` in the cache (T5Attention, BartAttention, ...)."""
    import inspect

    parameters = inspect.signature(module.forward).parameters
    return (cache_keyword(module) is not None and "key_value_states" in parameters
            and isinstance(getattr(module, "layer_idx", None), int))


def relative_position_bias(attention: nn.Module, length: int, device: torch.device) -> torch.Tensor | None:
    """T5-style attention: the relative position bias of `length` queries over `length` keys, from the layer that
    owns the bias table (`has_relative_attention_bias`, `compute_bias`); None for the layers that receive it."""
    if not getattr(attention, "has_relative_attention_bias", False):
        return None
    return attention.compute_bias(length, length, device=device)


# ---- caches ------------------------------------------------------------------------------------------------------
@functools.cache
def _frozen_layer_class():
    import torch
    from transformers.cache_utils import DynamicLayer

    class FrozenPrefixLayer(DynamicLayer):
        """A cache layer that prepends a fixed prefix and stores nothing: idempotent under recomputation."""

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys is None:
                return key_states, value_states
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

        def get_seq_length(self, *args, **kwargs) -> int:
            return 0 if self.keys is None else self.keys.shape[-2]

    return FrozenPrefixLayer


def frozen_prefix_cache(prefix: list[tuple[torch.Tensor | None, torch.Tensor | None]]):
    """A cache whose layer i prepends prefix[i] = (keys, values) (or nothing for (None, None)) to every call's
    keys and values and stores nothing. Assumes `Cache(layers=[...])` and `DynamicLayer` with `keys`, `values`,
    `is_initialized`, whose `update` returns the keys and values attention uses."""
    from transformers.cache_utils import Cache

    layers = []
    for keys, values in prefix:
        layer = _frozen_layer_class()()
        layer.keys, layer.values, layer.is_initialized = keys, values, True
        layers.append(layer)
    return Cache(layers=layers)


class _NeverUpdated(dict):
    """`is_updated` of a training cross-attention cache: always recompute, never remember."""

    def __setitem__(self, key, value) -> None:
        pass

    def get(self, key, default=None):
        return False


def encoder_decoder_cache(self_cache, cross_cache, recompute_cross: bool = False):
    """An `EncoderDecoderCache` of the two halves. With recompute_cross, cross-attention computes the encoder's
    keys and values at every call instead of reusing stored ones (its `is_updated` always reads False)."""
    from transformers.cache_utils import EncoderDecoderCache

    cache = EncoderDecoderCache(self_cache, cross_cache)
    if recompute_cross:
        cache.is_updated = _NeverUpdated()
    return cache


def cache_halves(cache) -> tuple[Any, Any] | None:
    """(self-attention cache, cross-attention cache) of an encoder-decoder cache; None for a single-stack cache."""
    from transformers.cache_utils import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        return cache.self_attention_cache, cache.cross_attention_cache
    return None


def empty_cache(config, encoder_decoder: bool):
    """The cache `generate()` would make for this model: dynamic, per config (sliding windows included)."""
    from transformers.cache_utils import DynamicCache

    if encoder_decoder:
        return encoder_decoder_cache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def allow_checkpointing_with_cache(module: nn.Module, allow: bool) -> None:
    """Transformers' checkpointed layers drop the cache keyword because a normal cache would grow again when a
    layer is recomputed; a frozen prefix cache never grows, so for one call the layers under `module` may keep it
    (`GradientCheckpointingLayer._can_checkpoint_with_cache`, set per instance and removed after)."""
    for layer in module.modules():
        if getattr(layer, "gradient_checkpointing", False) and hasattr(type(layer), "_can_checkpoint_with_cache"):
            if allow:
                layer._can_checkpoint_with_cache = True
            else:
                layer.__dict__.pop("_can_checkpoint_with_cache", None)


# ---- model classes and their attributes ------------------------------------------------------------------------
def no_split_modules(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks (`_no_split_modules`), looked up through PEFT wrappers."""
    while not hasattr(model, "_no_split_modules") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return set(getattr(model, "_no_split_modules", None) or ())


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in features, out features, transposed) of a Linear, or of a Conv1D, whose weight is transposed."""
    transposed = is_conv1d(module)
    in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
    return in_features, out_features, transposed


def is_exact_conv1d(module: nn.Module) -> bool:
    """`module` is transformers' Conv1D itself, not a subclass (whose forward may differ)."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is Conv1D


_TASK_TABLES = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES",
}


@functools.cache
def task_model_classes() -> dict[str, dict[str, set[str]]]:
    """task type -> model_type -> the model class names the Auto class of that task builds."""
    from transformers.models.auto import modeling_auto

    out = {}
    for task, table in _TASK_TABLES.items():
        out[task] = {model_type: {names} if isinstance(names, str) else set(names)
                     for model_type, names in getattr(modeling_auto, table).items()}
    return out


def name_or_path(config) -> str | None:
    """The Hub name or folder a model was loaded from (`config._name_or_path`), None when built from a config."""
    return getattr(config, "_name_or_path", None) or None


def position_limit(module: nn.Module) -> int | None:
    """How many positions a learned absolute position table under `module` allows (None for relative or rotary
    ones). Tables are named `wpe`, `position_embeddings` or `embed_positions`; BART-style tables reserve `offset`
    rows, RoBERTa-style ones the rows up to `padding_idx`."""
    import torch.nn as nn

    limits = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Embedding) and name.split(".")[-1] in ("wpe", "position_embeddings", "embed_positions"):
            offset = getattr(child, "offset", 0) or ((child.padding_idx + 1) if child.padding_idx is not None else 0)
            limits.append(child.num_embeddings - offset)
    return min(limits) if limits else None


def token_embeddings(stack: nn.Module) -> nn.Module:
    """The token embedding a stack applies to `input_ids`: its own `embed_tokens` (an encoder-decoder stack's,
    which may scale) or the model's input embeddings."""
    embed = getattr(stack, "embed_tokens", None)
    return embed if embed is not None else stack.get_input_embeddings()


@contextmanager
def quiet_loading():
    """Hide transformers' load report and weight-loading bar for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
