"""OFT (Qiu et al., 2023, orthogonal fine-tuning; as in HF PEFT 0.21.2): the layer input is rotated by a
block-diagonal orthogonal M before the frozen layer, y = W(xM) + b, i.e. the weight becomes W Mᵀ.

M holds r blocks of size b (r·b = in_features); block i is built from the stored upper triangle of a
skew-symmetric Q_i (`<module>.oft_R.weight`, [r, b(b−1)/2], or [1, ...] with block_share) as PEFT does:
  use_cayley_neumann=True (default)  M_i = I + 2Q + … + 2Q^(m−1) + Q^m, m = max(3, n−1), n = num_cayley_neumann_terms,
                                     PEFT's truncation of (I + Q)(I − Q)⁻¹
  use_cayley_neumann=False           M_i = (I − Q)(I + Q)⁻¹, the inverse of the above: PEFT's two modes turn
                                     the same parameters in opposite directions, and we follow both
  coft                               Q_i is first projected in place, as PEFT, into ‖Q_i‖_F ≤ eps / √(stored blocks)
  module_dropout p                   in training, int(p·r) random blocks are replaced by I (none with block_share)
The engine is additive: delta(x) = W(xM − x); with one active adapter the layer returns base(xM). Blocks act on
x viewed [..., r, b]; the full M is formed only to merge, ΔW = W(Mᵀ − I), cached so that unmerge is exact.

Differences from PEFT: GPT-2's Conv1D is adapted (PEFT refuses it), Embedding and Conv2d are not; a block
size or r that does not divide in_features is an error (PEFT warns and picks the nearest divisor, which our
message suggests); several active adapters add their changes Σ W(xM_k − x) where PEFT chains x M_1 M_2 …
(one active adapter matches exactly); PEFT 0.21.2 builds its multiplicative dropout but never applies it,
so its training ignores module_dropout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, PeftConfig
from ..compat import is_conv1d, linear_dims
from ..engine.layers import AdapterLayer, innermost
from ..engine.targeting import TargetError
from ..registry import MethodSpec, Preset, register_method, register_preset
from .lora import DEFAULT_TARGETS as LORA_TARGETS

__all__ = ["OFTConfig"]


@dataclass
class OFTConfig(PeftConfig):
    peft_type: Optional[str] = "OFT"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        if (self.r == 0) == (self.oft_block_size == 0) or min(self.r, self.oft_block_size) < 0:
            raise ConfigError(f"OFTConfig: set exactly one of r (number of blocks) and oft_block_size to a positive "
                              f"value and the other to 0; got r={self.r}, oft_block_size={self.oft_block_size}")
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be in [0, 1], got {self.module_dropout}")

    def to_saved_json(self) -> str:
        # PEFT warns that a Cayley-Neumann adapter without peft_version >= 0.18 has outdated math; ours is 0.21.2's
        return json.dumps({**json.loads(super().to_saved_json()), "peft_version": "0.21.2"}, indent=2, sort_keys=True) + "\n"


class OFTRotation(nn.Module):
    """Holds one adapter's stored upper triangles, so the checkpoint key is PEFT's `oft_R.weight`."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def cayley_neumann(q: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if n <= 2:
        return out + 2 * q if n == 2 else out.clone()
    power = q
    for _ in range(1, max(3, n - 1)):
        out, power = out + 2 * power, power @ q
    return out + power


@dataclass
class OFTHparams:
    r: int  # blocks
    block: int  # block size
    transposed: bool
    coft: bool
    eps: float
    dropout: float  # module_dropout: the fraction of blocks replaced by the identity while training
    terms: Optional[int]  # Cayley-Neumann terms; None: the exact Cayley transform


class OFTLinear(AdapterLayer):
    delta_depends_on_weight = True  # ΔW = W(Mᵀ − I)
    @classmethod
    def make_parts(cls, base_layer, config: OFTConfig, module_name: str):
        in_features, _, transposed = linear_dims(base_layer)
        field, value = ("r", config.r) if config.r else ("oft_block_size", config.oft_block_size)
        if in_features % value:
            nearest = min((d for d in range(1, in_features + 1) if in_features % d == 0), key=lambda d: abs(d - value))
            raise TargetError(f"OFT: {field}={value} does not divide the in_features={in_features} of {module_name}; "
                              f"choose one that does, e.g. {field}={nearest} (what HF PEFT would silently use), "
                              f"or exclude the module")
        r = config.r or in_features // value
        block = in_features // r
        weight = torch.zeros(1 if config.block_share else r, block * (block - 1) // 2,
                             device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        if not config.init_weights:
            nn.init.normal_(weight, std=0.1)
        terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        hparams = OFTHparams(r, block, transposed, config.coft, config.eps, config.module_dropout, terms)
        return {"oft_R": OFTRotation(weight)}, hparams

    def blocks(self, name: str) -> torch.Tensor:
        """The orthogonal blocks of M, [r or 1 (block_share), b, b]."""
        hp, weight = self.hparams[name], self.oft_R[name].weight
        if hp.coft:
            with torch.no_grad():  # the skew matrix's Frobenius norm is √2 times that of its upper triangle
                radius = hp.eps / weight.shape[0] ** 0.5
                norm = weight.norm(dim=1, keepdim=True) * 2 ** 0.5
                weight.mul_(torch.where(norm <= radius, 1.0, radius / norm))
        b, q = hp.block, weight.new_zeros(weight.shape[0], hp.block, hp.block)
        rows, cols = torch.triu_indices(b, b, 1, device=weight.device)
        q[:, rows, cols] = weight
        q = q - q.transpose(1, 2)
        eye = torch.eye(b, device=q.device, dtype=q.dtype)
        if hp.terms is not None:
            m = cayley_neumann(q, hp.terms)
        else:  # solve in fp32: linalg has no bf16 kernels
            m = torch.linalg.solve((eye + q).float(), (eye - q).float(), left=False).to(q.dtype)
        if hp.dropout and self.training and len(m) > 1:
            dropped = torch.randperm(len(m), device=m.device) < int(hp.dropout * len(m))
            m = torch.where(dropped[:, None, None], eye, m)
        return m

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hp, m = self.hparams[name], self.blocks(name)
        x = x.to(m.dtype).unflatten(-1, (hp.r, hp.block))
        return torch.einsum("...rk,rkc->...rc", x, m.expand(hp.r, -1, -1)).flatten(-2)

    def _weight(self, name: str) -> torch.Tensor:  # [out, in]
        weight = innermost(self.base_layer).weight
        return weight.t() if self.hparams[name].transposed else weight

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.oft_R[name].weight.dtype)
        return F.linear(self.rotate(name, x) - x, self._weight(name).to(x.dtype))

    def fused_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if isinstance(self.base_layer, AdapterLayer):
            return None  # a wrapper nested inside must see x itself
        return self.base_layer(self.rotate(name, x).to(x.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        hp, m = self.hparams[name], self.blocks(name)
        full = torch.block_diag(*m.expand(hp.r, -1, -1))
        weight = self._weight(name).to(full.dtype)
        delta = weight @ full.t() - weight
        return delta.t() if hp.transposed else delta


def oft_layer_for(module: nn.Module, config: OFTConfig):
    return OFTLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


register_method(MethodSpec("OFT", OFTConfig, oft_layer_for, "oft_", LORA_TARGETS))


# HF PEFT's default: blocks of 32 (MiniLM's 384 features make 12 rotations per layer); --r is not read
register_preset(Preset("oft", 1e-2, lambda k: OFTConfig(
    task_type=k.task_type, r=0, oft_block_size=32, target_modules=k.target_modules), "OFT, blocks of 32; `--r` is not read"))
