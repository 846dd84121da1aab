"""DoRA (Liu et al., 2024): LoRA with the weight split into direction and magnitude.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖        (row norms; m starts at ‖W‖, so training starts at W)
    y  = W'x + b = (Wx + b) + (m/‖·‖ − 1) ⊙ Wx + (m/‖·‖) ⊙ s·B(Ax)

As in the paper (§4.3) and HF PEFT, the norm is treated as a constant in backward. Unlike PEFT, the
forward never builds B·A: the row norms come from ‖W_i‖² + 2s·B_i(AW_iᵀ) + s²·B_i(AAᵀ)B_iᵀ, which needs
r × out and r × r products only, and Wx is read back from the base output when dropout is off.
Enabled by `LoraConfig(use_dora=True)`; the magnitude is saved under PEFT's key `<module>.lora_magnitude_vector`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.layers import innermost
from .lora import LoraConfig, LoraLinear


@torch.no_grad()
def row_norms(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """‖W_i + s·(BA)_i‖ for every output row i of W [out, in], without forming BA."""
    weight = weight.to(A.dtype)
    squared = torch.linalg.vector_norm(weight, dim=1).pow(2)
    squared += 2 * s * (B * (A @ weight.t()).t()).sum(dim=1)
    squared += s * s * ((B @ (A @ A.t())) * B).sum(dim=1)
    return squared.clamp_min(0).sqrt()


class DoraLinear(LoraLinear):
    delta_depends_on_weight = True  # the norms read W

    @classmethod
    def make_parts(cls, base_layer, config: LoraConfig, module_name: str):
        parts, hparams = super().make_parts(base_layer, config, module_name)
        weight = base_layer.weight.t() if hparams.transposed else base_layer.weight  # [out, in]
        # m starts at the norms the forward divides by, computed the same way: the scale is exactly 1
        norms = row_norms(weight, parts["lora_A"].weight, parts["lora_B"].weight, hparams.scaling)
        parts["lora_magnitude_vector"] = nn.Parameter(norms)
        return parts, hparams

    def _weight(self) -> torch.Tensor:
        weight = innermost(self.base_layer).weight
        return weight.t() if self.hparams[next(iter(self.hparams))].transposed else weight  # [out, in]

    def norms(self, name: str) -> torch.Tensor:
        return row_norms(self._weight(), self.lora_A[name].weight, self.lora_B[name].weight, self.hparams[name].scaling)

    def _change(self, name: str, x: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
        """(m/‖·‖ − 1)·Wx + (m/‖·‖)·s·B(Ax); `base` is Wx when the caller has it (no dropout)."""
        hp = self.hparams[name]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        x = x.to(A.dtype)
        if hp.dropout and self.training:
            x, base = F.dropout(x, hp.dropout, training=True), None
        scale = self.lora_magnitude_vector[name] / self.norms(name)
        if base is None:
            base = F.linear(x, self._weight().to(x.dtype))
        return (scale - 1) * base.to(x.dtype) + scale * hp.scaling * F.linear(F.linear(x, A), B)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._change(name, x, None)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        bias = innermost(self.base_layer).bias
        change = self._change(name, x, result - bias if bias is not None else result)
        return result + change.to(result.dtype)

    def fused_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None  # LoRA's fused node has no magnitude

    # ---- merge: W' = (m/‖·‖) ⊙ (W + s·BA) ----------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        hp = self.hparams[name]
        weight = self._weight()
        lora = self.lora_B[name].weight @ self.lora_A[name].weight * hp.scaling
        scale = (self.lora_magnitude_vector[name] / self.norms(name)).unsqueeze(1)
        delta = (scale - 1) * weight + scale * lora
        return delta.t() if hp.transposed else delta
