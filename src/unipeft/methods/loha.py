"""LoHa (Hyeon-Woo et al., 2022, FedPara; as in LyCORIS and HF PEFT): a Hadamard product of two low-rank
products, ΔW = s · (W1a W1b) ⊙ (W2a W2b), s = alpha / r, with W2b = 0 at init so training starts at W.

Its rank reaches r², but the product is elementwise, so ΔW is formed (out × in) in the forward, as in PEFT.
Config fields and checkpoint keys (`<module>.hada_w1_a`, ...) are HF PEFT's; PEFT adapts nn.Linear only,
unipeft also GPT-2's Conv1D (weight stored [in, out]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, PeftConfig
from ..engine.layers import AdapterLayer, is_conv1d
from ..registry import MethodSpec, register_method
from .lora import pattern_value


@dataclass
class LoHaConfig(PeftConfig):
    peft_type: Optional[str] = "LOHA"
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.r <= 0 or any(v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"LoHaConfig.r must be a positive integer, got r={self.r}, rank_pattern={self.rank_pattern}")
        if self.rank_dropout or self.module_dropout:
            raise ConfigError("LoHaConfig: rank_dropout and module_dropout are not implemented in unipeft; set them to 0")


class LoHaLinear(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: LoHaConfig, module_name: str):
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        transposed = is_conv1d(base_layer)
        out_features, in_features = base_layer.weight.shape[::-1] if transposed else base_layer.weight.shape
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        parts = {"hada_w1_a": torch.empty(out_features, r, **kw), "hada_w1_b": torch.empty(r, in_features, **kw),
                 "hada_w2_a": torch.empty(out_features, r, **kw), "hada_w2_b": torch.empty(r, in_features, **kw)}
        for tensor in parts.values():
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(parts["hada_w2_b"])
        parts = {name: nn.Parameter(tensor) for name, tensor in parts.items()}
        return parts, {"scaling": alpha / r, "transposed": transposed}

    def _delta_out_in(self, name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[name] @ self.hada_w1_b[name]
        w2 = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return w1 * w2 * self.hparams[name]["scaling"]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        delta = self._delta_out_in(name)
        return F.linear(x.to(delta.dtype), delta)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self._delta_out_in(name)
        return delta.t() if self.hparams[name]["transposed"] else delta


def loha_layer_for(module: nn.Module, config: LoHaConfig):
    return LoHaLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("LOHA", LoHaConfig, loha_layer_for, "hada_", "lora"))
