"""Prefix attention as a branch beside the attention (He et al., 2022, the `cross_attn` forms).

Each block's attention gets Δ = f(q P_kᵀ / √d_head) P_v per head, where q is the attention's own frozen
query projection of the block input, P_k and P_v are l learned keys and values per layer, and f is the
softmax (`cross_attn_noln`; `cross_attn` adds a LayerNorm on Δ) or a ReLU (`cross_attn_relu`: the
multi-head parallel adapter). Δ joins the heads' outputs before the output projection W_o, so the
wrapper of W_o adds W_o Δ to its output. Unlike the concat form (prefix tuning), the branch is
normalised on its own: its weight is not traded against the attention's (no gate). The query is the
projection's output as the model splits it, without position encodings (rotary, ALiBi, T5's relative
bias) or DeBERTa's separate q_bias, and every family scales the scores by 1/√d_head.

The keys and values come from the prefix-tuning module (`PrefixKeysValues`: optional MLP
reparameterisation, dropout, PEFT's flat `prompt_embeddings` layout), held as a side input that the
engine never inserts into the sequence or the cache; every block's wrapper reads its own pair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.capture import CapturingLayer
from ..compat import is_conv1d
from ..config import unsaved
from ..engine.layers import innermost, out_features
from ..engine.sites import block_paths, block_sites_of, resolve_in_block
from ..virtual.inputs import SIDE
from ..registry import MethodSpec, register_method
from .prefix import PrefixKeysValues, PrefixTuningConfig

__all__: list[str] = []

SIDE_SITE = "blocks"


@dataclass
class CrossPrefixHparams:
    capture: str  # the attention's input, read as the branch's input
    query: str  # the block's query projection
    layout: str  # how the query projection's output holds the query: plain, fused or per_head
    layer: int
    heads: int
    head_dim: int
    form: str  # prefix_form
    query_module: Optional[nn.Module] = None  # found when attached


@dataclass
class CrossPrefixConfig(PrefixTuningConfig):
    peft_type: Optional[str] = "CROSS_PREFIX"
    prefix_form: Literal["cross_attn", "cross_attn_noln", "cross_attn_relu"] = "cross_attn_noln"
    layers_to_transform: Optional[Union[list[int], int]] = None
    target_modules: Optional[list[str]] = None  # every block's attention output projection, filled in
    site_reads: Optional[dict] = unsaved()  # per target: its CrossPrefixHparams, read from the model

    def resolved(self, model: nn.Module) -> "CrossPrefixConfig":
        sites = block_sites_of(model, f"attn_option={self.prefix_form!r}")
        blocks = block_paths(model)
        mc = model.config
        heads = next(getattr(mc, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(mc, k, None))
        kv_heads = getattr(mc, "num_key_value_heads", None) or heads
        reads = {}
        for index, block in enumerate(blocks):
            query = resolve_in_block(model, block, sites.query)
            width = out_features(model.get_submodule(query)) // (1 if sites.query_layout == "plain" else 3)
            reads[resolve_in_block(model, block, sites.attn_out)] = CrossPrefixHparams(
                resolve_in_block(model, block, sites.attn_in), query, sites.query_layout, index, heads,
                width // heads, self.prefix_form)
        head_dim = next(iter(reads.values())).head_dim
        return replace(self, target_modules=list(reads), num_layers=len(blocks), num_transformer_submodules=1,
                       token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
                       encoder_hidden_size=self.encoder_hidden_size or kv_heads * head_dim, site_reads=reads)


def build_side_prefix(model: nn.Module, config: CrossPrefixConfig, layers=()) -> PrefixKeysValues:
    prefix = PrefixKeysValues(config, {SIDE_SITE: config.num_layers})
    prefix.kind = SIDE
    return prefix


class CrossPrefixLayer(CapturingLayer):
    """Wraps an attention output projection W_o; adds W_o Δ with Δ the prefix branch of that block."""

    mergeable = False

    def __init__(self, base_layer: nn.Module, state) -> None:
        super().__init__(base_layer, state)
        self._prompts: dict[str, nn.Module] = {}  # plain dict: the prefix module lives in the AdapterModel

    @classmethod
    def make_parts(cls, base_layer, config: CrossPrefixConfig, module_name: str):
        hparams = replace(config.site_reads[module_name])
        width = hparams.heads * hparams.head_dim
        weight = innermost(base_layer).weight
        parts = {"prefix_norm": nn.LayerNorm(width, device=weight.device, dtype=weight.dtype)} \
            if config.prefix_form == "cross_attn" else {}
        return parts, hparams

    def attach(self, adapter_model: nn.Module) -> None:
        super().attach(adapter_model)
        for name, hp in self.hparams.items():
            self._prompts[name] = adapter_model.part_of(name)
            hp.query_module = innermost(adapter_model.model.get_submodule(hp.query))

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self._prompts.pop(name, None)

    def delta_input(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self.captured(self.hparams[name].capture)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        heads, head_dim = hp.heads, hp.head_dim
        q = hp.query_module(x)
        b, t = q.shape[:2]
        if hp.layout == "fused":
            q = q[..., : heads * head_dim]
        elif hp.layout == "per_head":
            q = q.view(b, t, heads, 3, head_dim)[..., 0, :]
        q = q.reshape(b, t, heads, head_dim).transpose(1, 2)  # [b, heads, t, head_dim]
        keys, values = self._prompts[name].prefix()[SIDE_SITE][hp.layer]  # [1, kv_heads, l, head_dim]
        if keys.shape[1] != heads:  # grouped-query models: each key/value head serves a group of query heads
            keys, values = (p.repeat_interleave(heads // keys.shape[1], dim=1) for p in (keys, values))
        scores = q @ keys.to(q.dtype).transpose(-1, -2) / math.sqrt(head_dim)
        weights = F.relu(scores) if hp.form == "cross_attn_relu" else scores.softmax(dim=-1)
        branch = (weights @ values.to(q.dtype)).transpose(1, 2).reshape(b, t, heads * head_dim)
        if hp.form == "cross_attn":
            branch = self.prefix_norm[name](branch)
        weight = self.weight
        return branch @ weight if is_conv1d(innermost(self.base_layer)) else F.linear(branch, weight)


def cross_prefix_layer_for(module: nn.Module, config: CrossPrefixConfig):
    return CrossPrefixLayer if getattr(module, "weight", None) is not None and module.weight.dim() == 2 else None


register_method(MethodSpec("CROSS_PREFIX", CrossPrefixConfig, cross_prefix_layer_for, "prefix_",
                           model_part=build_side_prefix))
