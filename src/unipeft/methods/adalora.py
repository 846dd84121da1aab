"""AdaLoRA (Zhang et al., ICLR 2023): LoRA in SVD form, ΔW = B diag(E) A · alpha / (r0 + 1e-5), whose rank
budget is reallocated while training.

E starts at 0 (so training starts at W); A and B are kept near-orthogonal by a penalty added to the loss,
orth_reg_weight · mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F. After each optimizer step, `update_and_allocate` scores
every singular triplet (i-th row of A, i-th column of B, E_i) by exponential averages of |θ ∂L/∂θ| and their
uncertainty, and zeroes the E_i of the weakest triplets until the total rank meets a budget that falls
cubically from init_r per module (after tinit steps) to target_r per module (tfinal steps before total_step).
Numbers, config fields, checkpoint keys (`<module>.lora_A`, `lora_B`, `lora_E`) and `rank_pattern` (kept
triplets per `<module>.lora_E`; the file holds the kept ones only) are HF PEFT's; r0 stays init_r.
`unipeft train` runs the schedule itself; with transformers.Trainer add `unipeft.AdaLoraCallback()`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import is_conv1d, linear_dims
from ..config import ConfigError
from ..engine.layers import AdapterError, AdapterLayer, logical_name
from ..engine.sharding import numel
from ..registry import MethodSpec, PeftType, Preset, register_method, register_preset
from .lora import DEFAULT_TARGETS as LORA_TARGETS
from .lora import LoraConfig

__all__ = ["AdaLoraConfig"]

# HF PEFT's AdaLoRA defaults: every attention projection (and the FFN) where they differ from LoRA's
DEFAULT_TARGETS = {**LORA_TARGETS, "roberta": ("query", "key", "value", "dense"),
                   "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
                   "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "t5": ("q", "k", "v", "o", "wi", "wo"),
                   "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}

UNSCHEDULED_STEPS_WARNING = 100  # training forwards without update_and_allocate before we warn


PARTS = ("lora_A", "lora_E", "lora_B")  # the triplet of each rank: a row of A, an entry of E, a column of B


@dataclass
class AdaLoraConfig(LoraConfig):
    peft_type: Optional[Union[str, PeftType]] = PeftType.ADALORA
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None  # `<module>.lora_E` -> kept triplets (bools), written by the schedule

    def check_ranks(self) -> None:  # replaces LoRA's r checks: AdaLoRA reads init_r and target_r
        if self.use_dora:
            raise ConfigError("AdaLoraConfig does not support use_dora (neither does HF PEFT); use LoraConfig(use_dora=True)")
        if not 0 < self.target_r <= self.init_r:
            raise ConfigError(f"AdaLoraConfig needs 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoraConfig needs total_step, the number of optimizer steps of the whole run "
                              "(epochs × batches per epoch): the rank budget shrinks on that schedule. "
                              "`unipeft train --method adalora` sets it for you")
        if not 0 <= self.tinit < self.total_step - self.tfinal:
            raise ConfigError(f"AdaLoraConfig: tinit={self.tinit} and tfinal={self.tfinal} leave no steps to reallocate "
                              f"ranks in total_step={self.total_step}; lower tinit/tfinal or raise total_step")
        if self.deltaT < 1 or self.orth_reg_weight < 0 or not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"AdaLoraConfig needs deltaT >= 1, orth_reg_weight >= 0 and betas in (0, 1), got "
                              f"deltaT={self.deltaT}, orth_reg_weight={self.orth_reg_weight}, beta1={self.beta1}, beta2={self.beta2}")

    def kept_rank(self, module_name: str) -> int:
        for key, kept in (self.rank_pattern or {}).items():
            if key.split(".lora_E")[0] == module_name:
                return sum(bool(k) for k in kept)
        return self.init_r


@dataclass
class SVDHparams:
    scale: float  # lora_alpha / init_r
    dropout: float
    transposed: bool
    orthogonality: bool  # whether the orthogonality penalty is computed (orth_reg_weight > 0)
    kept: Optional[torch.Tensor] = None  # ranks kept by the last allocation (bool per rank); None: all


class SVDLinear(AdapterLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Each adapter's orthogonality terms from the latest forward: computed there, where FSDP and ZeRO-3
        # hold A and B whole, and added to the loss by `orthogonal_penalty`.
        self.orthogonality: dict[str, torch.Tensor] = {}

    @classmethod
    def make_parts(cls, base_layer, config: AdaLoraConfig, module_name: str):
        in_features, out_features, transposed = linear_dims(base_layer)
        r = config.kept_rank(module_name)
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        A, E, B = torch.randn(r, in_features, **kw), torch.randn(r, 1, **kw), torch.randn(out_features, r, **kw)
        if config.init_lora_weights:
            nn.init.normal_(A, std=0.02)
            nn.init.zeros_(E)
            nn.init.normal_(B, std=0.02)
        scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        hparams = SVDHparams(scaling / (config.init_r + 1e-5), config.lora_dropout, transposed,
                             config.orth_reg_weight > 0)
        return {"lora_A": nn.Parameter(A), "lora_E": nn.Parameter(E), "lora_B": nn.Parameter(B)}, hparams

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        if hp.orthogonality:
            self.orthogonality[name] = _orthogonality(self.lora_A[name], self.lora_B[name])
        scaled_A = self.lora_A[name] * self.lora_E[name]
        x = x.to(scaled_A.dtype)
        if hp.dropout and self.training:
            x = F.dropout(x, hp.dropout, training=True)
        return F.linear(F.linear(x, scaled_A) * hp.scale, self.lora_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.hparams[name].scale
        return delta.t() if self.hparams[name].transposed else delta

    def saved_parts(self, name: str) -> dict:
        kept = self.hparams[name].kept
        if kept is None:
            return self.parts_of(name)
        return {"lora_A": self.lora_A[name][kept], "lora_E": self.lora_E[name][kept], "lora_B": self.lora_B[name][:, kept]}

    @torch.no_grad()
    def keep(self, name: str, kept: torch.Tensor) -> None:
        """Zero the triplets outside `kept` (bool per rank); they stay out of the saved file."""
        self.lora_E[name].masked_fill_(~kept.view(-1, 1), 0.0)
        self.hparams[name].kept = kept


class RankAllocator:
    """Importance averages and the budget schedule of one AdaLoRA adapter."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, SVDLinear], name: str) -> None:
        self.config, self.name = config, name
        self.initial_budget = sum(numel(layer.lora_E[name]) for layer in layers.values())  # E is r × 1
        self.target_budget = config.target_r * len(layers)
        self.reset()
        self.steps_run = 0
        self.unscheduled_forwards = 0  # training forwards seen before the first update_and_allocate

    def reset(self) -> None:
        # by "<module>.<part>": the parameter objects change while FSDP gathers them
        self.importance: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to mask now)."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.initial_budget - self.target_budget) * left ** 3 + self.target_budget), step % c.deltaT == 0

    @torch.no_grad()
    def update(self, layers: dict[str, SVDLinear]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        if all(layer.lora_E[self.name].grad is None for layer in layers.values()):
            raise AdapterError(f"update_and_allocate found no gradients on AdaLoRA adapter {self.name!r}: it scores "
                               f"ranks by them, so call it after optimizer.step() and before optimizer.zero_grad()")
        for module, layer in layers.items():
            for part in PARTS:
                p, key = getattr(layer, part)[self.name], f"{module}.{part}"
                sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = self.importance.get(key, torch.zeros_like(p)) * b1 + (1 - b1) * sensitivity
                self.importance[key] = avg
                unc = self.uncertainty.get(key, torch.zeros_like(p))
                self.uncertainty[key] = unc * b2 + (1 - b2) * (sensitivity - avg).abs()

    def _score(self, module: str, layer: SVDLinear, part: str, dim: int) -> torch.Tensor:
        key, zero = f"{module}.{part}", torch.zeros_like(getattr(layer, part)[self.name])
        return (self.importance.get(key, zero) * self.uncertainty.get(key, zero)).mean(dim=dim)

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, SVDLinear], budget: int) -> dict[str, list[bool]]:
        name = self.name
        scores = {module: self._score(module, layer, "lora_E", 1) + (self._score(module, layer, "lora_A", 1)
                                                                     + self._score(module, layer, "lora_B", 0))
                  for module, layer in layers.items()}
        to_drop = self.initial_budget - budget
        if to_drop <= 0:
            threshold = -float("inf")
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())).float().cpu(), k=to_drop).values.item()
        pattern = {}
        for module, layer in layers.items():
            kept = scores[module] > threshold
            layer.keep(name, kept)
            pattern[f"{module}.lora_E"] = kept.tolist()
        return pattern


def step_state(adapter_model, name: str) -> dict:
    """The allocator's averages by "<module>.<part>", its step count and the rank pattern, for a checkpoint."""
    allocator, config = _allocator(adapter_model, name), adapter_model.peft_config[name]
    averages = {"importance": allocator.importance, "uncertainty": allocator.uncertainty}
    state = {"steps_run": allocator.steps_run, "rank_pattern": config.rank_pattern}
    for kind, values in averages.items():
        state.update({f"{kind}.{key}": value.detach().cpu() for key, value in values.items()})
    return state


def load_step_state(adapter_model, name: str, state: dict) -> None:
    """Restore what `step_state` saved; each layer's kept triplets follow the rank pattern (all, without one)."""
    allocator, config = _allocator(adapter_model, name), adapter_model.peft_config[name]
    allocator.reset()
    allocator.steps_run, config.rank_pattern = state["steps_run"], state["rank_pattern"]
    for module, layer in _layers(adapter_model, name).items():
        if config.rank_pattern:
            layer.keep(name, torch.tensor(config.rank_pattern[f"{module}.lora_E"], device=layer.lora_E[name].device))
        else:  # before the first masking every triplet is kept
            layer.hparams[name].kept = None
        for part in PARTS:
            device = getattr(layer, part)[name].device
            for kind, values in (("importance", allocator.importance), ("uncertainty", allocator.uncertainty)):
                if f"{kind}.{module}.{part}" in state:
                    values[f"{module}.{part}"] = state[f"{kind}.{module}.{part}"].to(device)


def _layers(adapter_model, name: str) -> dict[str, SVDLinear]:
    return {logical_name(module_name): layer for module_name, layer in adapter_model.adapter_layers()
            if isinstance(layer, SVDLinear) and name in layer.hparams}


def _allocator(adapter_model, name: str) -> RankAllocator:
    if name not in adapter_model.method_state:
        config = adapter_model.peft_config[name]
        adapter_model.method_state[name] = RankAllocator(config, _layers(adapter_model, name), name)
    return adapter_model.method_state[name]


def update_and_allocate(adapter_model, name: str, step: int) -> None:
    """After optimizer step `step` (0-based): update the importance scores, then mask to the step's budget."""
    config, allocator, layers = adapter_model.peft_config[name], _allocator(adapter_model, name), _layers(adapter_model, name)
    last_reallocation = config.total_step - config.tfinal
    if step < last_reallocation:
        allocator.update(layers)
        budget, mask_now = allocator.budget(step)
        if mask_now:
            config.rank_pattern = allocator.mask_to_budget(layers, budget)
    elif step == last_reallocation:  # the final allocation, to exactly target_r per module on average
        config.rank_pattern = allocator.mask_to_budget(layers, allocator.budget(step)[0])
        allocator.reset()
    elif config.rank_pattern:  # fine-tuning the final ranks: keep the dropped triplets at zero
        for module, layer in layers.items():
            kept = config.rank_pattern[f"{module}.lora_E"]
            layer.keep(name, torch.tensor(kept, device=layer.lora_E[name].device))
    allocator.steps_run += 1


def orthogonal_penalty(adapter_model, name: str) -> torch.Tensor | float:
    """orth_reg_weight · mean over A and B of every layer of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
    config, allocator = adapter_model.peft_config[name], _allocator(adapter_model, name)
    if adapter_model.training and allocator.steps_run == 0:
        allocator.unscheduled_forwards += 1
        if allocator.unscheduled_forwards == UNSCHEDULED_STEPS_WARNING:
            warnings.warn(f"AdaLoRA adapter {name!r} has run {UNSCHEDULED_STEPS_WARNING} training forwards but its rank "
                          f"schedule never ran, so no rank is reallocated. With transformers.Trainer pass "
                          f"callbacks=[unipeft.AdaLoraCallback()]; in your own loop call "
                          f"model.base_model.update_and_allocate(step) after each optimizer.step()", stacklevel=2)
    if config.orth_reg_weight == 0:
        return 0.0
    terms = [layer.orthogonality.pop(name, None) for layer in _layers(adapter_model, name).values()]
    terms = [t if t is not None else _orthogonality(layer.lora_A[name], layer.lora_B[name])  # the forward skipped it
             for t, layer in zip(terms, _layers(adapter_model, name).values())]
    return config.orth_reg_weight * torch.cat(terms).mean() if terms else 0.0


def _orthogonality(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
    grams = torch.stack([A @ A.t(), B.t() @ B])
    return torch.linalg.matrix_norm(grams - torch.eye(A.shape[0], dtype=A.dtype, device=A.device))


def adalora_layer_for(module: nn.Module, config: AdaLoraConfig):
    return SVDLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("ADALORA", AdaLoraConfig, adalora_layer_for, "lora_", DEFAULT_TARGETS,
                           loss_term=orthogonal_penalty, after_optimizer_step=update_and_allocate,
                           step_state=step_state, load_step_state=load_step_state))


# --r is the final average rank; training starts from 1.5x as many triplets (the paper's 12 -> 8), keeps them
# for the first 10% of steps and fine-tunes the final ranks for the last 20%
register_preset(Preset("adalora", 3e-2, lambda k: AdaLoraConfig(
    task_type=k.task_type, target_r=k.r, init_r=math.ceil(1.5 * k.r), lora_alpha=k.alpha, lora_dropout=k.dropout,
    target_modules=k.target_modules, total_step=k.total_steps, tinit=k.total_steps // 10, tfinal=k.total_steps // 5),
    "AdaLoRA: `--r` is the final average rank, the schedule runs inside the loop"))
