"""LN tuning (Zhao et al., 2023): train a copy of each normalisation layer (its scale and shift), freeze the rest.

Each adapter holds a copy of the targeted module, equal to it at init; the layer's output is the copy's
output. Config fields, default targets and checkpoint keys (`<module>.ln_tuning_layers.weight`) are Hugging
Face PEFT's; families PEFT has no default for get their own normalisation layers. Merging writes the copy's
tensors into the base module (exactly, and undone exactly); mixed batches add copy(x) - base(x) to the rows
of each adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..config import PeftConfig
from ..engine.layers import AdapterError, AdapterLayer, innermost
from ..engine.sharding import whole_copy
from ..registry import MethodSpec, PeftType, Preset, register_method, register_preset

__all__ = ["LNTuningConfig"]

# model_type -> the normalisation layers adapted by default: HF PEFT's table, then ours for the families it lacks
DEFAULT_TARGETS = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "qwen2": ("post_attention_layernorm",),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "gptj": ("ln_1", "ln_f"),
    # not in HF PEFT's table
    "bert": ("LayerNorm",), "roberta": ("LayerNorm",), "deberta": ("LayerNorm",), "deberta-v2": ("LayerNorm",),
    "opt": ("self_attn_layer_norm", "final_layer_norm"), "gpt_neo": ("ln_1", "ln_2", "ln_f"),
}


@dataclass
class LNTuningConfig(PeftConfig):
    peft_type: Optional[Union[str, PeftType]] = PeftType.LN_TUNING
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[Union[list[str], str]] = None

    def describe(self) -> str:
        return f"a trained copy of {super().describe().removeprefix('target modules: ')}"


class LNTuningLayer(AdapterLayer):
    @classmethod
    def make_parts(cls, base_layer, config: LNTuningConfig, module_name: str):
        return {"ln_tuning_layers": whole_copy(base_layer).requires_grad_(True)}, None

    def fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        return self.ln_tuning_layers[name](x) if self.base_layer is innermost(self.base_layer) else None

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.ln_tuning_layers[name](x) - innermost(self.base_layer)(x)

    def _pairs(self, name: str) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(base tensor, the adapter's copy of it), by parameter name."""
        tuned = dict(self.ln_tuning_layers[name].named_parameters())
        return [(param, tuned[key]) for key, param in innermost(self.base_layer).named_parameters()]

    def check_merge(self, name: str, module_name: str) -> None:
        if not all(torch.isfinite(tuned).all() for _, tuned in self._pairs(name)):
            raise AdapterError(f"safe_merge: merging adapter {name!r} into {module_name} gives non-finite weights; "
                               f"nothing was merged (check the adapter for NaN/inf values)")

    @torch.no_grad()
    def _apply_weight_delta(self, name: str, sign: float) -> None:
        """Merge adds copy - base to each base tensor and keeps that change; unmerge subtracts the same change."""
        merged = self.__dict__.setdefault("_merged_deltas", {})
        if sign > 0:
            merged[name] = [tuned.detach().to(base.dtype) - base for base, tuned in self._pairs(name)]
        for (base, _), change in zip(self._pairs(name), merged[name] if sign > 0 else merged.pop(name)):
            base.add_(change, alpha=sign)


def ln_tuning_layer_for(module: nn.Module, config: LNTuningConfig):
    return LNTuningLayer if any(True for _ in module.parameters(recurse=False)) else None


register_method(MethodSpec("LN_TUNING", LNTuningConfig, ln_tuning_layer_for, "ln_tuning_", DEFAULT_TARGETS))

register_preset(Preset("ln_tuning", 1e-2, lambda k: LNTuningConfig(task_type=k.task_type),
                       "a trained copy of each normalisation layer"))
