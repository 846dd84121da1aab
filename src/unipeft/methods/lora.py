"""LoRA (Hu et al., 2021): h = W x + (alpha / r) * B A x, with B = 0 at init so training starts at W.

Linear and GPT-2's Conv1D (weight stored transposed) share one layer; Embedding has its own lookup.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, PeftConfig
from ..compat import is_conv1d, is_exact_conv1d, linear_dims
from ..engine.layers import AdapterLayer
from ..registry import MethodSpec, PeftType, Preset, register_method, register_preset

__all__ = ["LoraConfig"]

# model_type -> the modules LoRA adapts when target_modules is not given: the attention's query and value
# projections, as in the LoRA paper (HF PEFT's defaults). LoHa, LoKr, OFT and VeRA default to the same.
DEFAULT_TARGETS = {
    "bert": ("query", "value"), "roberta": ("query", "value"), "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"), "gpt2": ("c_attn",), "bloom": ("query_key_value",),
    "opt": ("q_proj", "v_proj"), "gpt_neo": ("q_proj", "v_proj"), "gptj": ("q_proj", "v_proj"), "t5": ("q", "v"),
    "bart": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
}

# Hugging Face PEFT LoRA fields we do not implement; accepted while neutral (see PeftConfig.from_dict).
_PEFT_ONLY_FIELDS = {
    "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
    "runtime_config": None, "peft_version": None,
}


@dataclass
class LoraConfig(PeftConfig):
    peft_type: Optional[Union[str, PeftType]] = PeftType.LORA
    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, Literal["gaussian"]] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False  # DoRA (methods/dora.py): a learned magnitude per output row

    _peft_neutral_fields = _PEFT_ONLY_FIELDS

    def validate(self) -> None:
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian":
            raise ConfigError(f"{type(self).__name__}.init_lora_weights={self.init_lora_weights!r} is an HF PEFT "
                              f"initialisation not implemented in unipeft; supported: True (B = 0), 'gaussian', "
                              f"False (random B, for tests)")
        super().validate()
        self.check_ranks()
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def check_ranks(self) -> None:
        if self.r <= 0 or any(v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"LoraConfig.r must be a positive integer, got r={self.r}, rank_pattern={self.rank_pattern}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return (pattern_value(self.rank_pattern, module_name, self.r),
                pattern_value(self.alpha_pattern, module_name, self.lora_alpha))


def pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _scaling(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _plain_frozen_linear(module: nn.Module) -> bool:
    """nn.Linear or Conv1D exactly, frozen, without hooks or a patched forward (accelerate's offload
    hooks replace `forward` on the instance): its forward is one addmm that we may inline."""
    if type(module) is not nn.Linear and not is_exact_conv1d(module):
        return False
    bias = module.bias
    return not (module.weight.requires_grad or (bias is not None and bias.requires_grad)
                or "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen base weight W, as one autograd node.

    The same products as base_layer(x) followed by add_delta, with less traffic and fewer ops: the LoRA
    term is added into the base output in place (no second output-sized tensor), the LoRA part of the
    input gradient is added into the base part in place (no second input-sized tensor, no separate sum),
    and the scaling rides on the GEMMs' alpha or on rank-sized results, never on a token-sized tensor.
    Saved for backward: x, down = x A^T and the weights, as the unfused graph saves.
    `transposed` marks GPT-2's Conv1D, whose weight is stored [in, out].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_A, weight_B, scaling, transposed):
        x2 = x.reshape(-1, x.shape[-1])
        w_in_out = weight if transposed else weight.t()
        out = torch.mm(x2, w_in_out) if bias is None else torch.addmm(bias, x2, w_in_out)
        down = torch.mm(x2, weight_A.t())
        out.addmm_(down, weight_B.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, weight_A, weight_B, down)
        ctx.scaling, ctx.transposed = scaling, transposed
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight, weight_A, weight_B, down = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        scaling = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(down.t(), g2).mul_(scaling).t()  # [r, out] is the faster layout for this product
        if need_x or need_A:
            grad_down = torch.mm(g2, weight_B)  # unscaled
            if need_A:
                grad_A = torch.mm(grad_down.t(), x2).mul_(scaling)
            if need_x:
                grad_x = torch.mm(g2, weight.t() if ctx.transposed else weight)
                grad_x.addmm_(grad_down, weight_A, alpha=scaling)
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_A, grad_B, None, None


@dataclass
class LoraHparams:
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0
    transposed: bool = False  # GPT-2's Conv1D keeps its weight as [in, out]


class LoraLinear(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: LoraConfig, module_name: str):
        r, alpha = config.rank_and_alpha(module_name)
        weight = base_layer.weight
        in_features, out_features, transposed = linear_dims(base_layer)
        if r > min(in_features, out_features):
            warnings.warn(f"LoRA rank r={r} is above min(in, out)={min(in_features, out_features)} of a target layer: "
                          f"its update cannot have a higher rank, so r={min(in_features, out_features)} does the same "
                          f"with fewer parameters", stacklevel=2)
        kw = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        lora_A, lora_B = nn.Linear(in_features, r, **kw), nn.Linear(r, out_features, **kw)
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        if config.init_lora_weights is not False:
            nn.init.zeros_(lora_B.weight)
        hparams = LoraHparams(_scaling(config, r, alpha), config.lora_dropout, transposed)
        return {"lora_A": lora_A, "lora_B": lora_B}, hparams

    def _down(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        weight_A = self.lora_A[name].weight
        if x.dtype != weight_A.dtype:
            x = x.to(weight_A.dtype)
        if hp.dropout and self.training:
            x = F.dropout(x, hp.dropout, training=True)
        return F.linear(x, weight_A) * hp.scaling  # scale the rank-r tensor, not the wide output

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._down(name, x), self.lora_B[name].weight)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        down = self._down(name, x)
        weight_B = self.lora_B[name].weight
        if down.dtype != result.dtype:
            return result + F.linear(down, weight_B).to(result.dtype)
        # One fused matmul-and-add instead of a separate output-sized addition.
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), weight_B.t())
        return flat.view(result.shape)

    def fused_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        base = self.base_layer
        hp = self.hparams[name]
        weight, bias = base.weight, base.bias
        weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
        if (not _plain_frozen_linear(base) or (hp.dropout and self.training)
                or not x.dtype == weight.dtype == weight_A.dtype == weight_B.dtype
                or not x.device == weight.device == weight_A.device
                or torch.is_autocast_enabled(x.device.type)):  # autocast picks dtypes per op: general path
            return None
        return _LoraLinearFunction.apply(x, weight, bias, weight_A, weight_B, hp.scaling, hp.transposed)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = _factor_product(self, name)
        return delta.t() if self.hparams[name].transposed else delta


class LoraEmbedding(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: LoraConfig, module_name: str):
        r, alpha = config.rank_and_alpha(module_name)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        lora_A = nn.Parameter(torch.randn(r, weight.shape[0], **kw))
        lora_B = nn.Parameter(torch.randn(weight.shape[1], r, **kw))
        if config.init_lora_weights is not False:
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        hparams = LoraHparams(_scaling(config, r, alpha))
        return {"lora_embedding_A": lora_A, "lora_embedding_B": lora_B}, hparams

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        down = F.embedding(x, self.lora_embedding_A[name].t(), padding_idx=base.padding_idx)
        out = (down @ self.lora_embedding_B[name].t()) * self.hparams[name].scaling
        embed_scale = getattr(base, "embed_scale", None)  # BART-style scaled embeddings scale the lookup
        return out * embed_scale if embed_scale is not None else out

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return _factor_product(self, name).t()


def _factor_product(layer, name: str) -> torch.Tensor:
    """scaling * B @ A in [out, in] layout, for any LoRA layer."""
    A, B = layer.factors(name)
    return (B @ A) * layer.hparams[name].scaling


def lora_layer_for(module: nn.Module, config: LoraConfig):
    linear = is_conv1d(module) or isinstance(module, nn.Linear)
    if config.use_dora:
        if not linear:
            from ..engine.targeting import TargetError

            raise TargetError(f"use_dora=True works on Linear and Conv1D layers, not on a {type(module).__name__}; "
                              f"remove it from target_modules (or set use_dora=False)")
        from .dora import DoraLinear

        return DoraLinear
    if linear:
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None


def _union_targets(configs: list[LoraConfig]):
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, (list, tuple)) for t in targets):
        return sorted(set().union(*targets))
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    raise ConfigError("add_weighted_adapter: the adapters mix list and regex target_modules; use one kind")


@torch.no_grad()
def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Combine LoRA adapters into a new one (Hugging Face PEFT semantics).

    linear: A = sum(sign(w_i s_i) sqrt|w_i s_i| A_i), B = sum(sqrt|w_i s_i| B_i)   (equal ranks; an approximation)
    cat:    A = concat(w_i s_i A_i), B = concat(B_i)                   (exact: sum of w_i dW_i)
    svd:    the best rank-k factorisation of sum(w_i dW_i)
    The new adapter has lora_alpha = r, so its scaling is 1.
    """
    tuner.check_names(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    configs = [tuner.peft_config[a] for a in adapters]
    if not all(type(c) is LoraConfig and not c.use_dora for c in configs) or any(c.rank_pattern for c in configs):
        raise ConfigError("add_weighted_adapter combines plain LoRA adapters without rank_pattern only "
                          "(not DoRA, AdaLoRA or other methods: their weights do not add up factor by factor)")
    ranks = [c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type='linear' needs equal ranks, got {ranks}; use 'cat' or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise ConfigError(f"unknown combination_type {combination_type!r}; choose 'linear', 'cat' or 'svd'")
    new_config = replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=_union_targets(configs),
                         rank_pattern={}, alpha_pattern={})
    tuner.add_adapter(adapter_name, new_config)
    for _, layer in tuner.adapter_layers():
        if not isinstance(layer, (LoraLinear, LoraEmbedding)) or adapter_name not in layer.hparams:
            if adapter_name in getattr(layer, "modules_to_save", {}) and adapters[0] in layer.modules_to_save:
                layer.modules_to_save[adapter_name].load_state_dict(layer.modules_to_save[adapters[0]].state_dict())
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.hparams]
        new_A, new_B = layer.factors(adapter_name)
        new_A.zero_(), new_B.zero_()
        if combination_type == "svd":
            delta = sum(w * _factor_product(layer, a) for a, w in present)
            U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
            k = min(new_rank, S.shape[0])
            new_B[:, :k] = (U[:, :k] * S[:k]).to(new_B.dtype)
            new_A[:k] = Vh[:k].to(new_A.dtype)
            continue
        offset = 0
        for a, w in present:
            A, B = layer.factors(a)
            s = layer.hparams[a].scaling
            if combination_type == "linear":  # sqrt of |w * s| on both sides, the sign on A (as HF PEFT)
                root = math.sqrt(abs(w * s))
                new_A += math.copysign(root, w * s) * A
                new_B += root * B
            else:
                new_A[offset:offset + A.shape[0]] = w * s * A
                new_B[:, offset:offset + A.shape[0]] = B
                offset += A.shape[0]


register_method(MethodSpec("LORA", LoraConfig, lora_layer_for, "lora_", DEFAULT_TARGETS,
                           add_weighted_adapter=add_weighted_adapter))
register_preset(Preset("lora", 1e-3, lambda k: LoraConfig(
    task_type=k.task_type, r=k.r, lora_alpha=k.alpha, lora_dropout=k.dropout, target_modules=k.target_modules), ""))
register_preset(Preset("dora", 3e-3, lambda k: LoraConfig(
    task_type=k.task_type, r=k.r, lora_alpha=k.alpha, lora_dropout=k.dropout, target_modules=k.target_modules,
    use_dora=True), "LoRA with a learned magnitude, `use_dora=True`"))
