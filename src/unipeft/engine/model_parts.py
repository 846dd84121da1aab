"""Tensors an adapter shares across all its layers (VeRA's random projections), held once per adapter by the
AdapterModel rather than by any layer. A method builds them with `MethodSpec.model_parts`; HF PEFT keeps them
on its tuner, so the checkpoint key of part `p` is `base_model.p` (engine.checkpoint maps the keys).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import MODEL_PART_PREFIX


class ModelParts(nn.Module):
    """One adapter's model-level tensors, as buffers (frozen; they move with the model). `saved`: whether the
    checkpoint holds them (VeRA's save_projection=False regenerates them from a seed instead)."""

    def __init__(self, tensors: dict[str, torch.Tensor], saved: bool = True) -> None:
        super().__init__()
        self.saved = saved
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {MODEL_PART_PREFIX + name: tensor for name, tensor in self.named_buffers()} if self.saved else {}
