"""What an adapter holds once at the model level rather than in any layer: a prompt method's virtual tokens or
prefix (with its reparameterisation network), the cross-attention prefix's keys and values, VeRA's shared random
projections. A method builds its part with `MethodSpec.model_part`; the AdapterModel keeps one per adapter, by
adapter name, and plans, loads, saves, trains and deletes it with the adapter.

Parts live where HF PEFT keeps them, so parameter and checkpoint names match: virtual inputs in the
`prompt_encoder` ModuleDict (top-level `prompt_embeddings`, `prompt_encoder.*` keys), shared tensors in
`model_parts` (keys `base_model.<name>`, as on PEFT's tuner).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import MODEL_PART_PREFIX, CheckpointMismatchError
from .sharding import numel

PART_HOMES = ("prompt_encoder", "model_parts")  # the AdapterModel's ModuleDicts of parts


class ModelPart(nn.Module):
    home = "model_parts"  # which of PART_HOMES holds it

    def owns(self, key: str) -> bool:
        """Whether checkpoint key `key` (without `base_model.model.`) is this part's."""
        return key.startswith(MODEL_PART_PREFIX)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds of it, by key."""
        raise NotImplementedError

    def training_tensors(self) -> dict[str, torch.Tensor]:
        """What the file's form loses and training needs to resume (reparameterisation networks)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Fill it from the checkpoint's tensors that it owns."""
        check_and_copy(self.checkpoint_tensors(), tensors, source)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training updates: every parameter, unless it holds frozen modules (IDPG's encoder)."""
        return list(self.parameters())

    def inference_numel(self) -> int:
        """Trainable parameters still needed after training (the training-only networks folded away)."""
        return sum(numel(p) for p in self.trainable_parameters())

    def place(self, device: torch.device, dtype: torch.dtype) -> "ModelPart":
        """Move it next to the base weights (built parts start where their builder put them)."""
        return self.to(device, dtype)

    def attached(self, adapter_model: nn.Module) -> None:
        """Called once the AdapterModel holds it, before the adapter's layers attach (prompts install their hooks)."""

    def detached(self, adapter_model: nn.Module) -> None:
        """Called after the AdapterModel dropped it (the last prompt removes the hooks)."""


class SharedTensors(ModelPart):
    """Frozen tensors one adapter's layers share (VeRA's projections), as buffers. `saved`: whether the
    checkpoint holds them (VeRA's save_projection=False regenerates them from a seed instead)."""

    def __init__(self, tensors: dict[str, torch.Tensor], saved: bool = True) -> None:
        super().__init__()
        self.saved = saved
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {MODEL_PART_PREFIX + name: tensor for name, tensor in self.named_buffers()} if self.saved else {}

    def place(self, device: torch.device, dtype: torch.dtype) -> "SharedTensors":
        return self.to(device)  # they keep their own precision; layers cast what they read


def check_and_copy(expected: dict, found: dict, source: str, prefix: str = "") -> None:
    """Copy checkpoint tensors into a part's own, after checking names and shapes."""
    if set(expected) != set(found):
        raise CheckpointMismatchError(
            f"{source}: tensors {sorted(prefix + k for k in set(found) - set(expected))} are not made by this config "
            f"and {sorted(prefix + k for k in set(expected) - set(found))} are missing; the adapter was saved with "
            f"another config"
        )
    for key, target in expected.items():
        if tuple(found[key].shape) != tuple(target.shape):
            raise CheckpointMismatchError(
                f"{source}: {prefix}{key} has shape {tuple(found[key].shape)}, this model and config need "
                f"{tuple(target.shape)}; the adapter was saved for another base model or config"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
