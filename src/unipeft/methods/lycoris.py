"""What LoHa and LoKr share (LyCORIS, as in HF PEFT): config fields and checks, module dropout and rank
dropout in training.

Dropouts are drawn from torch's CPU generator in PEFT's order (the module draw on every training forward, even at
p = 0), so a seeded run draws the same masks as PEFT and leaves the generator where PEFT leaves it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..config import ConfigError, PeftConfig
from ..engine.layers import AdapterLayer
from .lora import pattern_value


@dataclass
class LycorisConfig(PeftConfig):
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # PEFT's option for Conv2d kernels; no effect on Linear / Conv1D
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.r <= 0 or any(v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"{name}.r must be a positive integer, got r={self.r}, rank_pattern={self.rank_pattern}")
        for dropout in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, dropout) <= 1.0:
                raise ConfigError(f"{name}.{dropout} must be in [0, 1], got {getattr(self, dropout)}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, module_name, self.r), pattern_value(self.alpha_pattern, module_name, self.alpha)


@dataclass
class LycorisHparams:
    scaling: float  # alpha / r
    transposed: bool
    rank_dropout: float
    module_dropout: float
    rank_dropout_scale: bool = False  # LoKr: rescale by the kept fraction (LoHa always does)


class LycorisLinear(AdapterLayer):
    """What LoHa and LoKr layers share: ΔW built as [out, in] by `_delta_out_in`, stored as the base keeps it."""

    def _delta_out_in(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self._delta_out_in(name)
        return delta.t() if self.hparams[name].transposed else delta


def module_dropped(training: bool, p: float) -> bool:
    """Whether this training forward skips the adapter entirely (probability p)."""
    return training and torch.rand(1).item() <= p


def rank_keep(rows: int, p: float, rescale: bool) -> torch.Tensor:
    """A 0/1 mask over the output rows of ΔW (each dropped with probability p), optionally divided by its mean."""
    keep = (torch.rand(rows) > p).float()
    return keep / keep.mean() if rescale else keep
