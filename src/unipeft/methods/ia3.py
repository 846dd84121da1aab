"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations, l = 1 at init so training starts at W.

    other layers:        y = (W x + b) * l        l has shape (out_features, 1)   scales the output
    feedforward layers:  y = W (x * l) + b        l has shape (1, in_features)    scales the input

Shapes, checkpoint keys (`<module>.ia3_l`) and config fields are Hugging Face PEFT's. Linear and GPT-2's
Conv1D (weight stored [in, out]) share one layer. Several active adapters on one layer compose by
multiplying, as in HF PEFT and as merging them does: y = (W (x * prod l_ff) + b) * prod l_out.
Merging multiplies W's input columns (feedforward) or output rows and the bias (others) by l; unmerging
divides, so an l with exact zeros is refused (the zeroed weights could not be restored).
One active adapter runs as base_layer(x * l) or base_layer(x) * l; the general path (mixed batches, several
adapters) adds W (x * (l - 1)) for feedforward layers, with W the innermost base weight: exact unless IA3
wraps another method's wrapper on the same module, whose change it would then not rescale.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, PeftConfig
from ..compat import is_conv1d, linear_dims
from ..engine.layers import AdapterError, AdapterLayer, innermost
from ..registry import MethodSpec, PeftType, Preset, register_method, register_preset

__all__ = ["IA3Config"]

# model_type -> HF PEFT's default IA3 targets: keys and values (or the fused projection) and the FFN's output
# projection, the last of each row, which is also the one that scales its input (FEEDFORWARD)
DEFAULT_TARGETS = {
    "bert": ("key", "value", "output.dense"), "roberta": ("key", "value", "output.dense"),
    "deberta": ("in_proj", "output.dense"), "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "gpt2": ("c_attn", "mlp.c_proj"), "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "fc2"), "gpt_neo": ("q_proj", "v_proj", "c_proj"), "gptj": ("q_proj", "v_proj", "fc_out"),
    "t5": ("k", "v", "wo"), "bart": ("q_proj", "v_proj", "fc2"), "llama": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
}
FEEDFORWARD = {family: targets[-1:] for family, targets in DEFAULT_TARGETS.items()}


@dataclass
class IA3Config(PeftConfig):
    """target_modules / feedforward_modules default to the family's lists (HF PEFT's); a feedforward entry
    matches a module whose name ends with it (a plain suffix, as HF PEFT), a string is a full-match regex.
    `layers_to_transform` / `layers_pattern` are ours (HF PEFT's IA3Config lacks them): written to
    adapter_config.json only when set."""

    peft_type: Optional[Union[str, PeftType]] = PeftType.IA3
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    _peft_neutral_fields = {"peft_version": None}  # HF PEFT's IA3Config has no other field we lack

    def validate(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().validate()
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if stray:
                raise ConfigError(f"IA3Config.feedforward_modules must be a subset of target_modules; "
                                  f"{stray} are not in target_modules={self.target_modules}")

    def resolved(self, model) -> "IA3Config":
        """A copy with the family's default target and feedforward lists filled in (recorded, as PEFT does)."""
        from ..engine.sites import default_targets, model_type_of

        targets = self.target_modules or list(default_targets(model, DEFAULT_TARGETS) or ()) or None
        if targets is None or self.feedforward_modules is not None:
            return replace(self, target_modules=targets)
        feedforward = default_targets(model, FEEDFORWARD)
        if feedforward is None:
            raise ConfigError(f"IA3Config.feedforward_modules is None and model type {model_type_of(model)!r} has no "
                              f"default; pass feedforward_modules=[...] (a subset of target_modules, [] for none)")
        if isinstance(targets, list):  # keep the saved config valid: a subset of an explicit target list
            feedforward = [f for f in feedforward if f in targets]
        return replace(self, target_modules=targets, feedforward_modules=list(feedforward))

    def is_feedforward(self, module_name: str) -> bool:
        spec = self.feedforward_modules or []
        if isinstance(spec, str):
            return re.fullmatch(spec, module_name) is not None
        return any(module_name.endswith(f) for f in spec)

    def to_dict(self):
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):  # unknown to HF PEFT: only when used
            if out[key] is None:
                del out[key]
        return out


@dataclass
class IA3Hparams:
    feedforward: bool  # scales the layer's input (feedforward_modules), not its output
    transposed: bool


class IA3Linear(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: IA3Config, module_name: str):
        weight = base_layer.weight
        in_features, out_features, transposed = linear_dims(base_layer)
        feedforward = config.is_feedforward(module_name)
        shape = (1, in_features) if feedforward else (out_features, 1)
        init = torch.ones if config.init_ia3_weights else torch.randn
        ia3_l = nn.Parameter(init(shape, device=weight.device, dtype=weight.dtype))
        return {"ia3_l": ia3_l}, IA3Hparams(feedforward, transposed)

    def _l(self, name: str) -> torch.Tensor:
        return self.ia3_l[name].flatten()

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The base layer's W x, without bias."""
        weight = self.base_weight()
        return F.linear(x.to(weight.dtype), weight.t() if self.hparams[name].transposed else weight)

    # ---- forward: y = (W (x * l_ff) + b) * l_out -----------------------------------------------
    def fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.hparams[name].feedforward:
            return self.base_layer((x * self._l(name)).to(x.dtype))
        result = self.base_layer(x)
        return (result * self._l(name)).to(result.dtype)

    def delta_input(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return x if self.hparams[name].feedforward else result

    def delta(self, name: str, source: torch.Tensor) -> torch.Tensor:
        scaled = source * (self._l(name) - 1)
        return self._linear(name, scaled) if self.hparams[name].feedforward else scaled

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.hparams[name].feedforward:
            return (result * self._l(name)).to(result.dtype)
        # result = (W (x * in_scale) + b) * out_scale from the adapters applied before this one; add what
        # makes it (W (x * in_scale * l) + b) * out_scale, so that adapters multiply
        in_scale, out_scale = self._earlier_scales(name)
        return result + (self.delta(name, x * in_scale) * out_scale).to(result.dtype)

    def _earlier_scales(self, name: str):
        in_scale = out_scale = 1.0
        for other in self.adapter_state.active:
            if other == name:
                break
            if other in self.hparams and other not in self.merged_adapters:
                if self.hparams[other].feedforward:
                    in_scale = in_scale * self._l(other)
                else:
                    out_scale = out_scale * self._l(other)
        return in_scale, out_scale

    # ---- merge: W <- W * l along the scaled axis (and b <- b * l for output scaling) ------------
    def _scaled(self, name: str, sign: float):
        """Base weight and bias with l multiplied in (sign +1) or divided out (-1); None: bias unchanged."""
        hp, l = self.hparams[name], self._l(name).detach()
        weight, bias = self.base_weight(), innermost(self.base_layer).bias
        in_axis = 0 if hp.transposed else 1
        shape = [1, 1]
        shape[in_axis if hp.feedforward else 1 - in_axis] = -1
        op = torch.mul if sign > 0 else torch.div
        new_weight = op(weight.data, l.view(shape)).to(weight.dtype)
        new_bias = None if hp.feedforward or bias is None else op(bias.data, l).to(bias.dtype)
        return new_weight, new_bias

    def _refuse_zeros(self, name: str, where: str) -> None:
        if (self.ia3_l[name] == 0).any():
            raise AdapterError(f"merging IA3 adapter {name!r} into {where}: its ia3_l has exact zeros, so unmerge "
                               f"could not restore the weights it zeroes; nothing was merged there")

    def check_merge(self, name: str, module_name: str) -> None:
        self._refuse_zeros(name, module_name)
        for tensor in self._scaled(name, 1.0):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise AdapterError(f"safe_merge: merging adapter {name!r} into {module_name} gives non-finite "
                                   f"weights; nothing was merged (check the adapter for NaN/inf values)")

    @torch.no_grad()
    def _apply_weight_delta(self, name: str, sign: float) -> None:
        if sign > 0:
            self._refuse_zeros(name, f"a {type(innermost(self.base_layer)).__name__} layer")
        new_weight, new_bias = self._scaled(name, sign)
        self.base_weight().data.copy_(new_weight)
        if new_bias is not None:
            innermost(self.base_layer).bias.data.copy_(new_bias)


def ia3_layer_for(module: nn.Module, config: IA3Config):
    return IA3Linear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("IA3", IA3Config, ia3_layer_for, "ia3_", DEFAULT_TARGETS))


register_preset(Preset("ia3", 3e-2, lambda k: IA3Config(task_type=k.task_type, target_modules=k.target_modules), ""))
