"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices A [r, in] and B [out, r] shared by every
adapted layer, and per layer two trained vectors that scale them: ΔW = diag(λ_b) B diag(λ_d) A, with λ_b = 0
at init so training starts at W and λ_d = d_initial.

A and B are drawn once per adapter from `projection_prng_key`, as large as the widest adapted layer; each
layer reads the top-left slice it needs. They are model-level parts (`MethodSpec.model_part`): saved as
`base_model.vera_A` / `base_model.vera_B` unless `save_projection=False`, per-layer vectors as
`<module>.vera_lambda_b` / `vera_lambda_d`. Config fields, initialisation and keys are HF PEFT's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import is_conv1d, linear_dims
from ..config import ConfigError, PeftConfig
from ..engine.layers import AdapterLayer
from ..engine.model_parts import SharedTensors
from ..registry import MethodSpec, Preset, register_method, register_preset
from .lora import DEFAULT_TARGETS as LORA_TARGETS  # HF PEFT's VeRA defaults are LoRA's (query and value)

__all__ = ["VeraConfig"]


@dataclass
class VeraConfig(PeftConfig):
    peft_type: Optional[str] = "VERA"
    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout}")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform over fan_in = shape[1] with gain √2, drawn from `generator` (HF PEFT's init of A and B)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(model: nn.Module, config: VeraConfig, layers) -> SharedTensors:
    """A [r, widest input] and B [widest output, r], the same for the same key on any machine."""
    widest_in = max(layer.hparams.in_features for layer in layers)
    widest_out = max(layer.hparams.out_features for layer in layers)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    vera_a = _kaiming_uniform((config.r, widest_in), generator)
    vera_b = _kaiming_uniform((widest_out, config.r), generator)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return SharedTensors({"vera_A": vera_a.to(device), "vera_B": vera_b.to(device)}, saved=config.save_projection)


@dataclass
class VeraHparams:
    in_features: int
    out_features: int
    transposed: bool


class VeraLinear(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: VeraConfig, module_name: str):
        weight = base_layer.weight
        in_features, out_features, transposed = linear_dims(base_layer)
        kw = {"device": weight.device, "dtype": weight.dtype}
        if config.init_weights:
            lambda_b, lambda_d = torch.zeros(out_features, **kw), torch.full((config.r,), config.d_initial, **kw)
        else:
            lambda_b, lambda_d = torch.ones(out_features, **kw), torch.randn(config.r, **kw)
        dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout else nn.Identity()
        parts = {"vera_lambda_b": nn.Parameter(lambda_b), "vera_lambda_d": nn.Parameter(lambda_d), "vera_dropout": dropout}
        return parts, VeraHparams(in_features, out_features, transposed)

    def attach(self, adapter_model: nn.Module) -> None:
        super().attach(adapter_model)
        self.__dict__["_projections"] = adapter_model.model_parts  # not a child: the AdapterModel holds them

    def _slices(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        hp, shared = self.hparams[name], self._projections[name]
        return shared.vera_A[:, :hp.in_features].to(dtype), shared.vera_B[:hp.out_features].to(dtype)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self._slices(name, self.vera_lambda_d[name].dtype)
        hidden = F.linear(self.vera_dropout[name](x).to(a.dtype), a) * self.vera_lambda_d[name]
        return F.linear(hidden, b) * self.vera_lambda_b[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self._slices(name, self.vera_lambda_d[name].dtype)
        delta = (self.vera_lambda_b[name][:, None] * b) @ (self.vera_lambda_d[name][:, None] * a)
        return delta.t() if self.hparams[name].transposed else delta


def vera_layer_for(module: nn.Module, config: VeraConfig):
    return VeraLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("VERA", VeraConfig, vera_layer_for, "vera_", LORA_TARGETS, model_part=projections))

register_preset(Preset("vera", 1e-2, lambda k: VeraConfig(task_type=k.task_type, r=256, target_modules=k.target_modules),
                       "VeRA: trained scalings of a shared frozen random pair"))
