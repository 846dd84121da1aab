"""LoHa (Hyeon-Woo et al., 2022, FedPara; as in LyCORIS and HF PEFT): a Hadamard product of two low-rank
products, ΔW = s · (W1a W1b) ⊙ (W2a W2b), s = alpha / r, with W2b = 0 at init so training starts at W.

Its rank reaches r², but the product is elementwise, so ΔW is formed (out × in) in the forward, as in PEFT.
Config fields and checkpoint keys (`<module>.hada_w1_a`, ...) are HF PEFT's; PEFT adapts nn.Linear only,
unipeft also GPT-2's Conv1D (weight stored [in, out]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import is_conv1d, linear_dims
from ..engine.layers import out_features
from ..registry import MethodSpec, Preset, register_method, register_preset
from .lora import DEFAULT_TARGETS as LORA_TARGETS
from .lycoris import LycorisConfig, LycorisHparams, LycorisLinear, module_dropped, rank_keep

__all__ = ["LoHaConfig"]


@dataclass
class LoHaConfig(LycorisConfig):
    peft_type: Optional[str] = "LOHA"
    init_weights: bool = True


class LoHaLinear(LycorisLinear):
    @classmethod
    def make_parts(cls, base_layer, config: LoHaConfig, module_name: str):
        r, alpha = config.rank_and_alpha(module_name)
        in_features, out_features, transposed = linear_dims(base_layer)
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        parts = {"hada_w1_a": torch.empty(out_features, r, **kw), "hada_w1_b": torch.empty(r, in_features, **kw),
                 "hada_w2_a": torch.empty(out_features, r, **kw), "hada_w2_b": torch.empty(r, in_features, **kw)}
        for tensor in parts.values():
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(parts["hada_w2_b"])
        parts = {name: nn.Parameter(tensor) for name, tensor in parts.items()}
        return parts, LycorisHparams(alpha / r, transposed, config.rank_dropout, config.module_dropout)

    def _delta_out_in(self, name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[name] @ self.hada_w1_b[name]
        w2 = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return w1 * w2 * self.hparams[name].scaling

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        if module_dropped(self.training, hp.module_dropout):
            return x.new_zeros(*x.shape[:-1], out_features(self))
        delta = self._delta_out_in(name)
        if self.training and hp.rank_dropout:  # LyCORIS's LoHa always rescales by the mask's mean
            delta = delta * rank_keep(delta.shape[0], hp.rank_dropout, rescale=True).to(delta)[:, None]
        return F.linear(x.to(delta.dtype), delta)


def loha_layer_for(module: nn.Module, config: LoHaConfig):
    return LoHaLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("LOHA", LoHaConfig, loha_layer_for, "hada_", LORA_TARGETS))


register_preset(Preset("loha", 1e-2, lambda k: LoHaConfig(
    task_type=k.task_type, r=k.r, alpha=k.alpha, target_modules=k.target_modules), "LoHa"))
