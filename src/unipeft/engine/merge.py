"""Take adapters out of the computation: merge them into the base weights (checked first, so a refusal changes
nothing), unmerge, unload every wrapper, delete one adapter. A part of `AdapterModel` (engine/inject.py), which
holds the user's model as `.model` and the adapters' state.
"""
from __future__ import annotations

import torch.nn as nn

from .layers import AdapterError, AdapterLayer
from .model_parts import PART_HOMES
from .sharding import whole_parameters


class MergeAndRemove:
    def merged_adapters(self) -> list[str]:
        return sorted({n for _, m in self.adapter_layers() if isinstance(m, AdapterLayer) for n in m.merged_adapters})

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        names = list(adapter_names or self.adapter_state.active)
        self.check_names(names)
        prompts = [n for n in names if n in self.prompt_encoder]
        if prompts:
            raise AdapterError(
                f"prompt-based adapters {prompts} cannot be merged into the weights: their virtual tokens are extra "
                f"inputs, not a weight change; keep the PeftModel (or unload() to drop them)"
            )
        layers = [(n, m) for n, m in self.adapter_layers() if isinstance(m, AdapterLayer)]
        unmergeable = sorted({f"{n} ({type(m).__name__} at {module_name})" for module_name, m in layers
                              for n in names if n in m.hparams and not m.mergeable})
        if unmergeable:
            raise AdapterError(
                f"cannot merge: the change of {unmergeable[0]}{' and others' if len(unmergeable) > 1 else ''} is "
                f"computed from the layer's input (through a nonlinearity or an attention of its own), not a change of "
                f"the weights; nothing was merged. Keep the PeftModel for inference (or unload() to drop the adapter)"
            )
        if safe_merge:  # check every layer first so a refusal leaves the base untouched
            for module_name, layer in layers:
                for name in names:
                    if name in layer.hparams and name not in layer.merged_adapters:
                        with whole_parameters(layer):
                            layer.check_merge(name, module_name)
        for _, layer in layers:
            with whole_parameters(layer, write_back=True):  # the base weight and the adapter's, whole
                layer.merge(names)

    def unmerge(self) -> None:
        for _, module in self.adapter_layers():
            if isinstance(module, AdapterLayer):
                with whole_parameters(module, write_back=True):
                    module.unmerge()

    def unload(self, merge: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Remove every wrapper; with merge=True the active adapters are first folded into the weights."""
        if merge:
            self.merge(adapter_names, safe_merge)
        keep = (list(adapter_names or self.adapter_state.active)) if merge else []
        for module_name, module in reversed(list(self.adapter_layers())):  # inner wrappers first
            if isinstance(module, AdapterLayer):
                module.detach()
                self.model.set_submodule(module_name, module.base_layer)
            else:
                chosen = next((n for n in keep if n in module.modules_to_save), None)
                self.model.set_submodule(module_name, module.modules_to_save[chosen] if chosen else module.original_module)
        self.peft_config.clear()
        self.method_state.clear()
        self.adapter_state.active = []
        for home in PART_HOMES:
            for name in list(getattr(self, home)):
                self._drop_part(name)
        return self.model

    def _drop_part(self, name: str) -> None:
        part = self.part_of(name)
        if part is not None:
            del getattr(self, part.home)[name]
            part.detached(self)

    def delete_adapter(self, name: str) -> None:
        self.check_names([name])
        for module_name, module in reversed(list(self.adapter_layers())):  # inner wrappers first
            module.remove_adapter(name)
            if not module.adapter_names:
                if isinstance(module, AdapterLayer):
                    module.detach()
                inner = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
                self.model.set_submodule(module_name, inner)
        del self.peft_config[name]
        self.method_state.pop(name, None)
        self._drop_part(name)
        state = self.adapter_state
        state.active = [n for n in state.active if n != name] or list(self.peft_config)[:1]
        self.refresh_trainable()
