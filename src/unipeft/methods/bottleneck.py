"""Bottleneck adapters: Δ = s · up(act(down(z))) added at the end of a block site (attention or FFN).

The form says what z is (He et al., 2022): `sequential` reads the site's output h (Houlsby et al., 2019),
`parallel` reads the site's input x (He et al.'s parallel adapter), `pfeiffer` (FFN only) reads the
residual stream after the FFN, LN(h + x) in post-norm models or h + residual in pre-norm ones, and adds
to h before the residual, as Pfeiffer et al. (2021) and the unified code place it. The scale s is a
number (4 for the scaled parallel adapter) or learned; an optional LayerNorm sits before `down` ("in")
or after the scaled `up` ("out"). With `init_option="lora"` the up-projection starts at zero, so the
model starts as the base model; "bert" draws every weight from N(0, 0.02) as the original code did.

The adapter lives in a wrapper of the site's output projection (`BlockSites.*_out`); a parallel or
pfeiffer adapter reads its z through a pre-hook on another module of the block (`engine.capture`).
Nothing of the model's own code is copied.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, PeftConfig, unsaved
from ..engine.capture import CapturingLayer
from ..engine.layers import innermost, out_features
from ..engine.sites import block_paths, block_sites_of, resolve_in_block
from ..registry import Knobs, MethodSpec, Preset, register_method, register_preset

__all__ = ["BottleneckConfig", "HoulsbyConfig", "PfeifferConfig", "ParallelAdapterConfig",
           "ScaledParallelAdapterConfig"]

ATTENTION, FFN = "attention", "ffn"
SEQUENTIAL, PARALLEL, PFEIFFER = "sequential", "parallel", "pfeiffer"

LEARNABLE = "learnable_scalar"
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


@dataclass
class BottleneckConfig(PeftConfig):
    peft_type: Optional[str] = "BOTTLENECK"
    sites: list[str] = field(default_factory=lambda: [FFN])
    adapter_option: Literal["sequential", "parallel", "pfeiffer"] = PARALLEL
    bottleneck_size: int = 64
    non_linearity: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    adapter_dropout: float = 0.0
    layernorm_option: Literal["in", "out", "none"] = "none"
    init_option: Literal["bert", "lora"] = "lora"
    scalar: Union[float, Literal["learnable_scalar"]] = 1.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    # The site output projections the adapter wraps: filled in from `sites` for the model at hand.
    target_modules: Optional[list[str]] = None
    # per target: (the module whose input it captures, the post-norm module), read from the model
    site_reads: Optional[dict] = unsaved()

    def describe(self) -> str:  # its sites, not every wrapped projection
        return f"{self.adapter_option} adapter at {' and '.join(self.sites)}, bottleneck {self.bottleneck_size}"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not self.sites or any(s not in (ATTENTION, FFN) for s in self.sites) or len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"{name}.sites must be distinct values among ['attention', 'ffn'], got {self.sites!r}")
        if self.adapter_option == PFEIFFER and ATTENTION in self.sites:
            raise ConfigError(f"{name}: adapter_option='pfeiffer' is an FFN placement; use sites=['ffn'] or "
                              f"adapter_option='sequential' for the attention site")
        if self.bottleneck_size <= 0:
            raise ConfigError(f"{name}.bottleneck_size must be a positive integer, got {self.bottleneck_size}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ConfigError(f"{name}.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")

    def resolved(self, model: nn.Module) -> "BottleneckConfig":
        """A copy naming the wrapped projection of every block's chosen sites, and where each adapter reads z."""
        sites = block_sites_of(model, type(self).__name__)
        reads = {}
        for block in block_paths(model):
            where = lambda relative: resolve_in_block(model, block, relative)  # noqa: E731
            if ATTENTION in self.sites:
                reads[where(sites.attn_out)] = (where(sites.attn_in) if self.adapter_option == PARALLEL else None, None)
            if FFN in self.sites:
                if self.adapter_option == SEQUENTIAL:
                    reads[where(sites.ffn_out)] = (None, None)
                elif self.adapter_option == PARALLEL:
                    reads[where(sites.ffn_out)] = (where(sites.ffn_in), None)
                elif sites.ffn_norm_first(model.config):  # pre-norm: the residual is the norm's input (or output)
                    residual = sites.ffn_in if sites.residual_is_normed(model.config) else sites.ffn_norm
                    reads[where(sites.ffn_out)] = (where(residual), None)
                else:  # post-norm: z = LN(h + x), x being the FFN input
                    reads[where(sites.ffn_out)] = (where(sites.ffn_in), where(sites.ffn_norm))
        return replace(self, target_modules=list(reads), site_reads=reads)


@dataclass
class BottleneckHparams:
    option: str  # sequential or parallel
    capture: Optional[str]  # the module whose input a parallel adapter reads
    post_norm: Optional[str]  # the block's norm a sequential adapter's output goes through (Houlsby, Pfeiffer)
    scale: Optional[float]  # None: a learned scalar
    norm_at: str  # layernorm_option: in, out or none
    act: str
    dropout: float


class BottleneckLayer(CapturingLayer):
    """Wraps a site's output projection; adds each active adapter's Δ computed from its z."""

    mergeable = False

    def __init__(self, base_layer: nn.Module, state) -> None:
        super().__init__(base_layer, state)
        self._norms: dict[str, nn.Module] = {}  # plain dict: the model's own norm, not a child of this layer

    @classmethod
    def make_parts(cls, base_layer, config: BottleneckConfig, module_name: str):
        d, r = out_features(base_layer), config.bottleneck_size
        kw = {"device": innermost(base_layer).weight.device, "dtype": innermost(base_layer).weight.dtype}
        parts = {"adapter_down": nn.Linear(d, r, **kw), "adapter_up": nn.Linear(r, d, **kw)}
        if config.init_option == "lora":
            nn.init.kaiming_uniform_(parts["adapter_down"].weight, a=5 ** 0.5)
            nn.init.zeros_(parts["adapter_up"].weight)
        else:
            for linear in parts.values():
                nn.init.normal_(linear.weight, std=0.02)
        for linear in parts.values():
            nn.init.zeros_(linear.bias)
        if config.layernorm_option != "none":
            parts["adapter_norm"] = nn.LayerNorm(d, **kw)
        if config.scalar == LEARNABLE:
            parts["adapter_scale"] = nn.Parameter(torch.ones(1, **kw))
        capture, post_norm = config.site_reads[module_name]
        hparams = BottleneckHparams(config.adapter_option, capture, post_norm,
                                    None if config.scalar == LEARNABLE else float(config.scalar),
                                    config.layernorm_option, config.non_linearity, config.adapter_dropout)
        return parts, hparams

    def attach(self, adapter_model: nn.Module) -> None:
        super().attach(adapter_model)
        for hp in self.hparams.values():
            if hp.post_norm is not None:
                self._norms[hp.post_norm] = innermost(adapter_model.model.get_submodule(hp.post_norm))

    def delta_input(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        if hp.option == SEQUENTIAL:
            return result
        captured = self.captured(hp.capture)
        if hp.option == PARALLEL:
            return captured
        if hp.post_norm is not None:
            return self._norms[hp.post_norm](result + captured)
        return result + captured

    # ---- the adapter function ------------------------------------------------------------------
    def delta(self, name: str, z: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        if hp.norm_at == "in":
            z = self.adapter_norm[name](z)
        down = _ACTIVATIONS[hp.act](self.adapter_down[name](z.to(self.adapter_down[name].weight.dtype)))
        if hp.dropout and self.training:
            down = F.dropout(down, hp.dropout, training=True)
        up = self.adapter_up[name](down)
        up = up * (self.adapter_scale[name] if hp.scale is None else hp.scale)
        return self.adapter_norm[name](up) if hp.norm_at == "out" else up


def bottleneck_layer_for(module: nn.Module, config: BottleneckConfig):
    return BottleneckLayer if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2 else None


# ---- named presets: points of the design space (He et al., 2022, Table 1) ----------------------------
@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Sequential adapters after the attention output and after the FFN output (Houlsby et al., 2019)."""
    sites: list[str] = field(default_factory=lambda: [ATTENTION, FFN])
    adapter_option: Literal["sequential", "parallel", "pfeiffer"] = SEQUENTIAL


@dataclass
class PfeifferConfig(BottleneckConfig):
    """One sequential adapter after the FFN, reading the residual stream (Pfeiffer et al., 2021)."""
    adapter_option: Literal["sequential", "parallel", "pfeiffer"] = PFEIFFER


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    """An adapter beside the FFN: reads the FFN input, adds to its output (He et al., 2022)."""
    adapter_option: Literal["sequential", "parallel", "pfeiffer"] = PARALLEL


@dataclass
class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    """The parallel adapter with its output scaled by s = 4 (He et al., 2022); scalar="learnable_scalar" learns s."""
    scalar: Union[float, Literal["learnable_scalar"]] = 4.0


register_method(MethodSpec("BOTTLENECK", BottleneckConfig, bottleneck_layer_for, "adapter_"))


def _preset(config_cls: type) -> Callable[[Knobs], BottleneckConfig]:
    def build(knobs: Knobs) -> BottleneckConfig:
        size = {"bottleneck_size": knobs.bottleneck_size} if knobs.bottleneck_size else {}
        return config_cls(task_type=knobs.task_type, adapter_dropout=knobs.dropout, **size)
    return build


register_preset(Preset("houlsby", 3e-3, _preset(HoulsbyConfig), ""))
register_preset(Preset("pfeiffer", 3e-3, _preset(PfeifferConfig), ""))
register_preset(Preset("parallel", 3e-3, _preset(ParallelAdapterConfig), ""))
# its output is scaled by 4: the same step as the parallel adapter's 3e-3, roughly
register_preset(Preset("scaled_parallel", 1e-3, _preset(ScaledParallelAdapterConfig), "bottleneck adapters"))
