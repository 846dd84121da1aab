"""LoKr (Yeh et al., 2023, as in LyCORIS and HF PEFT): a Kronecker product of two small factors,
ΔW = s · kron(W1, W2), s = alpha / r, with out = a·b and in = c·d split by `factorization`, W1 [a, c], W2 [b, d].

W1 is full, or w1_a @ w1_b when decompose_both and r < max(a, c) / 2; W2 is full, or w2_a @ w2_b when
r < max(b, d) / 2. init_weights=True zeros W1 (w1_a), "lycoris" zeros W2 (w2_b), False zeros nothing, so
training starts at W unless False. rank_dropout (output rows of ΔW) and module_dropout act in training only.
Config fields and checkpoint keys (`<module>.lokr_w1`, ...) are HF PEFT's. Differences from PEFT: PEFT adapts
nn.Linear and Conv1d/2d, unipeft nn.Linear and GPT-2's Conv1D (weight stored [in, out]); a decompose_factor
that does not divide a targeted dimension is refused (PEFT silently picks other factors); in training PEFT
draws a module-dropout number even when module_dropout is 0, unipeft only when it is not. Unlike PEFT, the
forward never forms the out × in ΔW: kron(W1, W2) x is W1 X W2ᵀ with x viewed as a [c, d] matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from ..config import ConfigError
from ..compat import is_conv1d, linear_dims
from ..engine.layers import out_features
from ..engine.targeting import TargetError
from ..registry import MethodSpec, Preset, register_method, register_preset
from .lora import DEFAULT_TARGETS as LORA_TARGETS
from .lycoris import LycorisConfig, LycorisHparams, LycorisLinear, module_dropped, rank_keep

__all__ = ["LoKrConfig"]


@dataclass
class LoKrConfig(LycorisConfig):
    peft_type: Optional[str] = "LOKR"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, Literal["lycoris"]] = True

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"LoKrConfig.decompose_factor must be -1 (factors near the square root) or a "
                              f"positive divisor of the layer sizes, got {self.decompose_factor}")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of `dim` into two factors: (factor, dim // factor) for a dividing factor, else
    (dim // m, m) with m the smallest divisor for which m * m >= dim (127 -> (1, 127), 128 -> (8, 16))."""
    if factor > 0:
        return factor, dim // factor
    m = next(m for m in range(math.isqrt(dim - 1) + 1, dim + 1) if dim % m == 0)
    return dim // m, m


class _KroneckerApply(torch.autograd.Function):
    """(W1 ⊗ W2) x for every token, as W1 X W2ᵀ with x viewed as X [c, d]: never the out × in matrix, and
    Z = X W2ᵀ is recomputed in backward rather than saved, so no token-sized tensor is kept beyond x."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        (a, c), (b, d) = w1.shape, w2.shape
        ctx.save_for_backward(x, w1, w2)
        ctx.x_dtype = x.dtype
        z = x.reshape(-1, c, d) @ w2.t()  # [n, c, b]
        return torch.einsum("ac,ncb->nab", w1, z).reshape(*x.shape[:-1], a * b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1_param, w2_param = ctx.saved_tensors
        # forward ran under autocast (bf16 products) when grad is bf16: backward computes in grad's dtype, and
        # hands each gradient back in its input's dtype
        x, w1, w2 = (t.to(grad.dtype) for t in (x, w1_param, w2_param))
        (a, c), (b, d) = w1.shape, w2.shape
        X, G = x.reshape(-1, c, d), grad.reshape(-1, a, b)
        grad_z = torch.einsum("ac,nab->ncb", w1, G)
        grad_x = (grad_z @ w2).reshape(x.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w1 = torch.einsum("nab,ncb->ac", G, X @ w2.t()).to(w1_param.dtype) if ctx.needs_input_grad[1] else None
        grad_w2 = torch.einsum("ncb,ncd->bd", grad_z, X).to(w2_param.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w1, grad_w2


class LoKrLinear(LycorisLinear):
    @classmethod
    def make_parts(cls, base_layer, config: LoKrConfig, module_name: str):
        r, alpha = config.rank_and_alpha(module_name)
        in_features, out_features, transposed = linear_dims(base_layer)
        factor = config.decompose_factor
        for what, size in (("out_features", out_features), ("in_features", in_features)):
            if factor > 0 and size % factor:
                raise TargetError(f"LoKr: decompose_factor={factor} does not divide {module_name}.{what}={size}; "
                                  f"use decompose_factor=-1 (factors near the square root) or a divisor of every "
                                  f"targeted size")
        (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
        low_rank_w1 = config.decompose_both and r < max(a, c) / 2
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)} if low_rank_w1 else {"lokr_w1": (a, c)}
        shapes.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)} if r < max(b, d) / 2 else {"lokr_w2": (b, d)})
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        parts = {name: torch.empty(shape, **kw) for name, shape in shapes.items()}
        for tensor in parts.values():
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        zeroed = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        for name in set(zeroed) & set(parts):
            nn.init.zeros_(parts[name])
        parts = {name: nn.Parameter(tensor) for name, tensor in parts.items()}
        return parts, LycorisHparams(alpha / r, transposed, config.rank_dropout, config.module_dropout,
                                     config.rank_dropout_scale)

    def _factor(self, name: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}", {})  # absent until some adapter has this factor full
        if name in full:
            return full[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def _delta_out_in(self, name: str) -> torch.Tensor:
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2")) * self.hparams[name].scaling

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams[name]
        if module_dropped(self.training, hp.module_dropout):
            return x.new_zeros(*x.shape[:-1], out_features(self))
        w1, w2 = self._factor(name, "w1"), self._factor(name, "w2")
        y = _KroneckerApply.apply(x.to(w1.dtype), w1 * hp.scaling, w2)
        if self.training and hp.rank_dropout:
            y = y * rank_keep(y.shape[-1], hp.rank_dropout, hp.rank_dropout_scale).to(y)
        return y


def lokr_layer_for(module: nn.Module, config: LoKrConfig):
    return LoKrLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("LOKR", LoKrConfig, lokr_layer_for, "lokr_", LORA_TARGETS))


register_preset(Preset("lokr", 1e-2, lambda k: LoKrConfig(
    task_type=k.task_type, r=k.r, alpha=k.alpha, target_modules=k.target_modules), "LoKr"))
