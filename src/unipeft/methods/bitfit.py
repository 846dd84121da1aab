"""BitFit (Ben Zaken et al., 2022): train only the biases.

The adapter holds a bias delta per targeted module, zero at init: y = base(x) + Δb. Training Δb is
training b (same gradient), while the base stays frozen, switchable and shared by several adapters;
merging adds Δb into the base bias exactly. No Hugging Face PEFT equivalent; same file layout.

Groups: "norm" = LayerNorm-like modules with a bias (anywhere); "attention" / "ffn" = the other biased
modules inside a block's attention or FFN sites (`sites.BlockSites`: the subtrees at `attn_in`, `attn_out`,
resp. `ffn_in`, `ffn_out`, plus cross-attention); "all" = every module with a bias outside the task heads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn

from ..config import ConfigError, PeftConfig
from ..engine.layers import AdapterLayer, innermost
from ..engine.sites import block_paths, block_sites_of, resolve_in_block
from ..engine.targeting import logical_modules, name_matches
from ..registry import MethodSpec, PeftType, Preset, register_method, register_preset

__all__ = ["BitFitConfig"]

GROUPS = ("attention", "ffn", "norm")
# Cross-attention sub-modules of decoder blocks (BART, T5, BERT-as-decoder); BlockSites names self-attention only.
_CROSS_ATTENTION = ("encoder_attn", "EncDecAttention", "crossattention")
# Modules whose bias is added along dim 1 (channels) rather than the last dim.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("LayerNorm", "Norm"))


@dataclass
class BitFitConfig(PeftConfig):
    peft_type: Optional[Union[str, PeftType]] = PeftType.BITFIT
    bias_groups: Union[str, list[str]] = "all"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def describe(self) -> str:
        return f"biases of {self.bias_groups} ({len(self.target_modules or [])} modules)"

    def validate(self) -> None:
        super().validate()
        groups = [self.bias_groups] if isinstance(self.bias_groups, str) else list(self.bias_groups)
        bad = [g for g in groups if g not in ("all", *GROUPS)]
        if bad or not groups:
            raise ConfigError(f"BitFitConfig.bias_groups must be 'all' or a non-empty list drawn from {list(GROUPS)}, "
                              f"got {self.bias_groups!r}")

    def resolved(self, model: nn.Module) -> "BitFitConfig":
        """A copy whose target_modules lists the biased modules of the chosen groups (narrowed by an
        explicit target_modules). Raises before the model is touched if there are none."""
        groups = {self.bias_groups} if isinstance(self.bias_groups, str) else set(self.bias_groups)
        needs_blocks = "all" not in groups and bool(groups & {"attention", "ffn"})
        sites = block_sites_of(model, f"BitFit bias_groups {sorted(groups & {'attention', 'ffn'})}") if needs_blocks else None
        modules = list(logical_modules(model))
        heads = [n for n, _ in modules if name_matches(n, self.modules_to_save)]
        roots = _group_roots(model, sites) if needs_blocks else {}
        chosen = []
        for name, module in modules:
            if not has_bias(module) or _under(name, heads):
                continue
            if self.target_modules is not None and not name_matches(name, self.target_modules):
                continue
            group = "norm" if is_norm(module) else next((g for g, paths in roots.items() if _under(name, paths)), None)
            if "all" in groups or group in groups:
                chosen.append(name)
        if not chosen:
            raise ConfigError(
                f"BitFit found no module with a bias in bias_groups={self.bias_groups!r}"
                + (f" and target_modules={self.target_modules!r}" if self.target_modules is not None else "")
                + f" of {type(model).__name__} (outside the task heads); this model has no biases to train there. "
                f"Use LoRA or IA3 instead, or other bias_groups"
            )
        return replace(self, target_modules=chosen)


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _group_roots(model: nn.Module, sites) -> dict[str, list[str]]:
    """The module paths whose subtrees are each block's attention (self and cross) and FFN."""
    roots: dict[str, list[str]] = {"attention": [], "ffn": []}
    for block in block_paths(model):
        cross = [f"{block}.{n}" for n, _ in innermost(model.get_submodule(block)).named_modules()
                 if n.split(".")[-1] in _CROSS_ATTENTION]
        roots["attention"] += [resolve_in_block(model, block, sites.attn_in), resolve_in_block(model, block, sites.attn_out), *cross]
        roots["ffn"] += [resolve_in_block(model, block, sites.ffn_in), resolve_in_block(model, block, sites.ffn_out)]
    return roots


@dataclass
class BitFitHparams:
    channel_first: bool  # convolutions and norms over channels: the bias broadcasts over dimension 1


class BitFitLayer(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: BitFitConfig, module_name: str):
        bias = base_layer.bias
        hparams = BitFitHparams(isinstance(base_layer, _CHANNEL_FIRST))
        return {"bitfit_bias": nn.Parameter(torch.zeros_like(bias))}, hparams

    def _shaped(self, name: str, out: torch.Tensor) -> torch.Tensor:
        bias = self.bitfit_bias[name].to(out.dtype)
        return bias.view(-1, *[1] * (out.dim() - 2)) if self.hparams[name].channel_first else bias

    def delta_input(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result  # the delta does not read x; the output gives the shape to broadcast to

    def delta(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._shaped(name, out).expand_as(out)  # routing index_adds rows of this

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self._shaped(name, result)

    def base_weight(self) -> nn.Parameter:
        return innermost(self.base_layer).bias

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.bitfit_bias[name]


def bitfit_layer_for(module: nn.Module, config: BitFitConfig):
    return BitFitLayer if has_bias(module) else None


register_method(MethodSpec("BITFIT", BitFitConfig, bitfit_layer_for, "bitfit_"))


register_preset(Preset("bitfit", 1e-2, lambda k: BitFitConfig(task_type=k.task_type), ""))
