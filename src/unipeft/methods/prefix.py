"""Prefix tuning: learned keys and values prepended in the attention of every layer.

The flat form (`prompt_embeddings`, [num_virtual_tokens, num_layers * 2 * token_dim]) is Hugging Face
PEFT's layout; with `prefix_projection` it is produced by a Tanh MLP during training, which the
checkpoint keeps beside the flat form so training can resume. Grouped-query models store keys and
values with their key/value head count, as PEFT does.

Encoder-decoder models put the prefix in the decoder's self-attention, as PEFT does. `prefix_sites`
(a unipeft field) adds the encoder's self-attention and the decoder's cross-attention, as in Li & Liang's
prefix tuning for BART; each site has its own keys and values for every layer. The flat form then holds
one block of columns per chosen site, in the order `decoder_self`, `encoder_self`, `cross`:

    [t, num_layers * 2 * token_dim | encoder_layers * 2 * token_dim | decoder_layers * 2 * token_dim]

Inside a block, layer i has the columns of pair i (keys, then values, each heads x head_dim), except that
`decoder_self` keeps PEFT's mapping (decoder layer i reads pair 2i mod num_layers). With the default
`prefix_sites=("decoder_self",)` the tensor and `adapter_config.json` are exactly PEFT's.

`projection_lr_scale` (a unipeft field, 1.0 = PEFT) makes the MLP train as if at that multiple of the
optimizer's learning rate. The MLP multiplies Adam's step: each step moves every weight of its last layer by
about lr, so every prefix value moves by about lr times the summed |activations| of the hidden layer (some
300 for an 800-wide MLP), where a flat prefix moves by lr. At the rates adapters train at (1e-3) the prefix
then overruns the layer's own keys within a few dozen steps, takes most of the attention, and the model
forgets its input (its loss settles at the label prior). He et al. train these prefixes at 1e-4. The
weights are kept divided by the scale and multiplied back in the forward pass, so under Adam (whose step
does not depend on the gradient's size) they move scale times as fast; checkpoints hold the multiplied
values, so a file means the same whatever the scale.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..config import ConfigError
from ..virtual.prefix_attention import CROSS, DECODER_SELF, ENCODER_SELF, PREFIX_SITES, attention_layers
from ..virtual.inputs import PREFIX
from ..virtual.prefix_cache import supports_cache
from ..registry import MethodSpec, Preset, register_method, register_preset
from .prompt import PromptLearningConfig, VirtualPrompt

__all__ = ["PrefixTuningConfig"]


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: Optional[str] = "PREFIX_TUNING"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[Literal["zero"]] = None
    # unipeft: attention sites of encoder-decoder models that get a prefix (see the module docstring)
    prefix_sites: tuple[str, ...] = (DECODER_SELF,)
    # unipeft: dropout on the prefix keys and values while training (the unified design space's prefix_dropout)
    prefix_dropout: float = 0.0
    # unipeft: the MLP of prefix_projection trains as if at this multiple of the learning rate (see above)
    projection_lr_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        sites = list(self.prefix_sites)
        unknown = [s for s in sites if s not in PREFIX_SITES]
        if unknown or not sites or len(set(sites)) != len(sites):
            raise ConfigError(
                f"PrefixTuningConfig.prefix_sites must be distinct values among {list(PREFIX_SITES)}, got {sites!r}"
            )
        self.prefix_sites = tuple(s for s in PREFIX_SITES if s in sites)  # the order of the stored blocks
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ConfigError(f"PrefixTuningConfig.prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if not 0.0 < self.projection_lr_scale <= 1.0:
            raise ConfigError(f"PrefixTuningConfig.projection_lr_scale must be in (0, 1], got {self.projection_lr_scale}: "
                              f"it slows the MLP's training (1.0 = PEFT's)")

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.prefix_sites == (DECODER_SELF,):  # PEFT's behaviour: write PEFT's file, field for field
            del data["prefix_sites"]
        if not self.prefix_dropout:
            del data["prefix_dropout"]
        if self.projection_lr_scale == 1.0:
            del data["projection_lr_scale"]
        return data

    def model_sizes(self, model: nn.Module) -> dict:
        """Keys and values are stored per key/value head (grouped-query models have fewer than query heads)."""
        sizes = super().model_sizes(model)
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv_heads = getattr(mc, "num_key_value_heads", None)
        if kv_heads:
            head_dim = getattr(mc, "head_dim", None) or sizes["token_dim"] // sizes["num_attention_heads"]
            sizes.update(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        return sizes

    def resolved(self, model: nn.Module) -> "PrefixTuningConfig":
        config = super().resolved(model)
        if self.num_transformer_submodules is None and getattr(model.config, "is_encoder_decoder", False):
            config = replace(config, num_transformer_submodules=2)  # what PEFT records (and needs) for seq2seq
        if config.encoder_hidden_size is None:
            config = replace(config, encoder_hidden_size=config.token_dim)
        return config


class PrefixKeysValues(VirtualPrompt):
    kind = PREFIX

    def __init__(self, config: PrefixTuningConfig, site_layers: dict[str, int]) -> None:
        dim = config.token_dim
        width = sum(site_layers.values()) * 2 * dim
        project = config.prefix_projection and not config.inference_mode
        encoder = nn.Sequential(
            nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width),
        ) if project else None
        super().__init__(config.num_virtual_tokens, dim if project else width, encoder)
        if config.init_weights == "zero":
            nn.init.zeros_(encoder[-1].weight if project else self.embedding.weight)
            if project:
                nn.init.zeros_(encoder[-1].bias)
        self.lr_scale = config.projection_lr_scale if project else 1.0
        if self.lr_scale != 1.0:
            with torch.no_grad():
                for param in self.parameters():
                    param.div_(self.lr_scale)
        self.num_virtual = config.num_virtual_tokens
        self.dropout = config.prefix_dropout
        self.sites = tuple(site_layers)
        self.site_layers = site_layers
        self.heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        # PEFT's encoder-decoder layout (num_transformer_submodules=2) gives decoder layer i the stored
        # pair 2i mod num_layers; we read it the same way so checkpoints mean the same in both libraries.
        layers = config.num_layers
        self.pair_of_layer = [(2 * i) % layers if config.num_transformer_submodules == 2 else i for i in range(layers)]

    def forward(self) -> torch.Tensor:
        if self.encoder is None or self.lr_scale == 1.0:
            return super().forward()
        first, activation, last = self.encoder
        s = self.lr_scale  # (s W) x + s b = s (W x + b): the layers are called as modules (sharding hooks run)
        return s * last(activation(s * first(s * self.embedding.weight)))

    def training_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().training_tensors()
        return tensors if self.lr_scale == 1.0 else {k: v * self.lr_scale for k, v in tensors.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        if self.lr_scale != 1.0 and self.encoder is not None:
            tensors = {k: v / self.lr_scale if k.startswith("prompt_encoder.") else v for k, v in tensors.items()}
        super().load_tensors(tensors, source)

    def prefix(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        flat = self()  # [t, sum of layers * 2 * heads * head_dim]
        if self.dropout and self.training:
            flat = nn.functional.dropout(flat, self.dropout, training=True)
        pairs = flat.view(self.num_virtual, -1, self.heads, self.head_dim).permute(1, 2, 0, 3).unsqueeze(1)
        out, start = {}, 0
        for site, layers in self.site_layers.items():
            block = pairs[start:start + 2 * layers]
            start += 2 * layers
            order = self.pair_of_layer if site == DECODER_SELF else range(layers)
            out[site] = [(block[2 * j], block[2 * j + 1]) for j in order]  # each [1, heads, t, head_dim]
        return out


def build_prefix(model: nn.Module, config: PrefixTuningConfig, layers=()) -> PrefixKeysValues:
    if not supports_cache(model):
        raise ConfigError(
            f"prefix tuning needs attention that reads a key/value cache, and {type(model).__name__}'s takes none; "
            f"use prompt tuning or P-tuning for this model"
        )
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim {config.token_dim} is not divisible by num_attention_heads {config.num_attention_heads}")
    sites = config.prefix_sites
    extra = [s for s in sites if s != DECODER_SELF]
    if extra and not getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(
            f"prefix_sites {list(extra)} exist only in encoder-decoder models, but {type(model).__name__} has a single "
            f"stack (decoder-only or encoder-only); use prefix_sites=('decoder_self',), the default, which puts the "
            f"prefix in its self-attention"
        )
    site_layers = {DECODER_SELF: config.num_layers} if DECODER_SELF in sites else {}
    for site, stack in ((ENCODER_SELF, "get_encoder"), (CROSS, "get_decoder")):
        if site in sites:
            site_layers[site] = attention_layers(getattr(model, stack)())
            if not site_layers[site]:
                raise ConfigError(
                    f"prefix_sites {site!r}: found no attention module that reads a cache in {type(model).__name__}'s "
                    f"{stack[4:]}; this model supports only prefix_sites=('decoder_self',)"
                )
    return PrefixKeysValues(config, site_layers)


register_method(MethodSpec("PREFIX_TUNING", PrefixTuningConfig, None, "prompt_", model_part=build_prefix))


register_preset(Preset("prefix", 1e-1, lambda k: PrefixTuningConfig(
    task_type=k.task_type, num_virtual_tokens=k.num_virtual_tokens), "prefix tuning"))
