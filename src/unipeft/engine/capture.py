"""Adapter layers that read a tensor from elsewhere in their block: the input of another module.

A block-level method wraps the projection at the end of a site and needs the site's input (or the
residual stream). `CapturingLayer` registers a forward pre-hook on each module named in its adapters'
`hparams[name].capture`, keeps the tensor for the rest of the forward, and removes the hooks when detached.
Hooks sit on the innermost module, which stays in the model while wrappers of other methods come and go.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import AdapterLayer, innermost


class CapturingLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, state) -> None:
        super().__init__(base_layer, state)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._captured: dict[str, torch.Tensor] = {}

    def attach(self, adapter_model: nn.Module) -> None:
        for hp in self.hparams.values():
            path = getattr(hp, "capture", None)
            if path is not None and path not in self._hooks:
                target = innermost(adapter_model.model.get_submodule(path))
                self._hooks[path] = target.register_forward_pre_hook(self._capturer(path), with_kwargs=True)

    def _capturer(self, path: str):
        def capture(module, args, kwargs):
            self._captured[path] = args[0] if args else kwargs["hidden_states"]
        return capture

    def captured(self, path: str) -> torch.Tensor:
        found = self._captured.get(path)
        if found is None:
            raise RuntimeError(f"{type(self).__name__} found no input captured at {path} in this forward")
        return found

    def detach(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._captured.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._captured.clear()  # keep no activation alive after the forward

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        still_read = {getattr(hp, "capture", None) for hp in self.hparams.values()}
        for path in [p for p in self._hooks if p not in still_read]:
            self._hooks.pop(path).remove()
