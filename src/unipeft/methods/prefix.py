"""Prefix tuning: learned keys and values prepended in the attention of every layer.

The flat form (`prompt_embeddings`, [num_virtual_tokens, num_layers * 2 * token_dim]) is Hugging Face
PEFT's layout; with `prefix_projection` it is produced by a Tanh MLP during training, which the
checkpoint keeps beside the flat form so training can resume. Grouped-query models store keys and
values with their key/value head count, as PEFT does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..config import ConfigError
from ..engine.virtual import PREFIX, supports_cache
from ..registry import MethodSpec, register_method
from .prompt import PromptLearningConfig, VirtualPrompt


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: Optional[str] = "PREFIX_TUNING"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[Literal["zero"]] = None

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

    def __init__(self, config: PrefixTuningConfig) -> None:
        layers, dim = config.num_layers, config.token_dim
        project = config.prefix_projection and not config.inference_mode
        encoder = nn.Sequential(
            nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, layers * 2 * dim),
        ) if project else None
        super().__init__(config.num_virtual_tokens, dim if project else layers * 2 * dim, encoder)
        if config.init_weights == "zero":
            nn.init.zeros_(encoder[-1].weight if project else self.embedding.weight)
            if project:
                nn.init.zeros_(encoder[-1].bias)
        self.num_virtual = config.num_virtual_tokens
        self.layout = (layers, config.num_attention_heads, dim // config.num_attention_heads)
        # PEFT's encoder-decoder layout (num_transformer_submodules=2) gives decoder layer i the stored
        # pair 2i mod num_layers; we read it the same way so checkpoints mean the same in both libraries.
        self.pair_of_layer = [(2 * i) % layers if config.num_transformer_submodules == 2 else i for i in range(layers)]

    def prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers, heads, head_dim = self.layout
        flat = self()  # [t, layers * 2 * heads * head_dim]
        pairs = flat.view(self.num_virtual, layers * 2, heads, head_dim).permute(1, 2, 0, 3).unsqueeze(1)
        return [(pairs[2 * j], pairs[2 * j + 1]) for j in self.pair_of_layer]  # each [1, heads, t, head_dim]


def build_prefix(model: nn.Module, config: PrefixTuningConfig) -> PrefixKeysValues:
    if not supports_cache(model):
        raise ConfigError(
            f"prefix tuning needs attention that reads past_key_values, which {type(model).__name__} lacks; "
            f"use prompt tuning or P-tuning for this model"
        )
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim {config.token_dim} is not divisible by num_attention_heads {config.num_attention_heads}")
    return PrefixKeysValues(config)


register_method(MethodSpec("PREFIX_TUNING", PrefixTuningConfig, None, "prompt_", "", build_virtual=build_prefix))
