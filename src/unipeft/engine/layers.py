"""What every adapter layer shares, written once: the active set, disable, mixed-batch routing, merge.

A weight-level method subclasses `AdapterLayer` and supplies three things: `make_parts` (its tensors
for one adapter), `delta` (the change to the layer output, computed from `delta_input`: the layer's input x
unless the method reads something else) and `delta_weight` (the same change as a weight, for merging).
Everything else lives here. Wrappers of different methods may nest on one module (LoRA inside a
sequential adapter, say): each adds its change to what the wrapper inside it returns.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..compat import linear_dims

BASE = "__base__"  # mixed-batch name meaning "no adapter for this row"


class AdapterError(ValueError):
    """Misuse of adapters: unknown names, merge conflicts, non-finite merges, routing mismatches."""


class Routing:
    """Mixed-batch plan: row i of the batch goes through adapter names[i].

    Index tensors are built once per (batch size, device) and shared by every layer of the forward.
    A batch that is k times longer than `names` (beam search, num_return_sequences) repeats each name
    k times in a row, as `generate` expands its inputs.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        key = (batch_size, device)
        if key not in self._groups:
            if batch_size % len(self.names):
                raise AdapterError(
                    f"adapter_names has {len(self.names)} entries but a layer saw a batch of {batch_size} rows"
                )
            repeat = batch_size // len(self.names)
            rows: dict[str, list[int]] = {}
            for i in range(batch_size):
                rows.setdefault(self.names[i // repeat], []).append(i)
            self._groups[key] = [(n, torch.tensor(r, device=device)) for n, r in rows.items()]
        return self._groups[key]


class AdapterState:
    """Shared by all adapter layers of one model, so switching is O(1) and never drifts per layer."""

    def __init__(self) -> None:
        self.active: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None


def named_part_tensors(prefix: str, parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Checkpoint keys (adapter name already stripped) of one adapter's parts at module `prefix`."""
    out = {}
    for part, value in parts.items():
        if isinstance(value, nn.Module):
            for pname, tensor in value.state_dict(keep_vars=True).items():
                out[f"{prefix}.{part}.{pname}"] = tensor
        else:
            out[f"{prefix}.{part}"] = value
    return out


class AdapterLayer(nn.Module):
    """Wraps `base_layer` (kept intact as a child) and adds the deltas of the active adapters."""

    mergeable = True  # False where the change is not a function of the weights alone (it reads the input)
    delta_depends_on_weight = False  # True where ΔW is a function of W (DoRA, OFT): merge keeps what it added

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_state = state
        self.part_names: list[str] = []
        self.hparams: dict[str, Any] = {}  # adapter name -> the method's own hyperparameter dataclass
        self.merged_adapters: list[str] = []

    # ---- what a method supplies ----------------------------------------------------------------
    @classmethod
    def make_parts(cls, base_layer: nn.Module, config, module_name: str) -> tuple[dict[str, Any], Any]:
        """New tensors of one adapter (modules or parameters by part name) and its hyperparameters (a dataclass
        of the method's, e.g. LoraHparams; None when it has none)."""
        raise NotImplementedError

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_input(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What `delta` reads: the layer input x by default; the output for sequential methods."""
        return x

    def delta_weight(self, name: str) -> torch.Tensor:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weights")

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + delta; a method may fuse the addition into its last matmul."""
        return result + self.delta(name, self.delta_input(name, x, result))

    def fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """base_layer(x) + delta of the one active adapter in a single step, or None for the general path."""
        return None

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.hparams)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for model code that reads it (T5 checks `wo.weight.dtype`), as HF PEFT's layers do."""
        return innermost(self.base_layer).weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(innermost(self.base_layer), "bias", None)

    def parts_of(self, name: str) -> dict[str, Any]:
        return {p: getattr(self, p)[name] for p in self.part_names}

    def saved_parts(self, name: str) -> dict[str, Any]:
        """What the checkpoint holds of adapter `name`: its parts, unless the method prunes them (AdaLoRA)."""
        return self.parts_of(name)

    def add_adapter(self, name: str, parts: dict[str, Any], hparams: Any) -> None:
        for part, value in parts.items():
            if part not in self.part_names:
                container = nn.ModuleDict() if isinstance(value, nn.Module) else nn.ParameterDict()
                self.add_module(part, container)
                self.part_names.append(part)
            getattr(self, part)[name] = value
        self.hparams[name] = hparams

    def attach(self, adapter_model: nn.Module) -> None:
        """Connect to other modules of the model (hooks) once an adapter was added; see `detach`.
        `adapter_model` is the engine's AdapterModel: the user's model is its `.model`."""

    def detach(self) -> None:
        """Undo what the layer did to the model outside itself (hooks), before it is removed."""

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self._apply_weight_delta(name, sign=-1.0)
            self.merged_adapters.remove(name)
        for part in self.part_names:
            container = getattr(self, part)
            if name in container:
                del container[name]
        self.hparams.pop(name, None)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.adapter_state
        if not (state.disabled or args or kwargs) and state.routing is None and len(state.active) == 1:
            name = state.active[0]  # the training case: one adapter, unmerged, no routing
            if name in self.hparams and not self.merged_adapters:
                fused = self.fused_forward(name, x)
                if fused is not None:
                    return fused
        result = self.base_layer(x, *args, **kwargs)
        if state.disabled:
            return result
        if state.routing is not None:
            for name, rows in state.routing.groups(x.shape[0], x.device):
                if name in self.hparams:
                    source = self.delta_input(name, x, result).index_select(0, rows)
                    result = result.index_add(0, rows, self.delta(name, source).to(result.dtype))
            return result
        for name in state.active:
            if name in self.hparams and name not in self.merged_adapters:
                result = self.add_delta(name, x, result)
        return result

    # ---- merge ---------------------------------------------------------------------------------
    def base_weight(self) -> nn.Parameter:
        """The frozen tensor a merge changes (through any wrappers nested inside this one)."""
        return innermost(self.base_layer).weight

    def check_merge(self, name: str, module_name: str) -> None:
        merged = self.base_weight().data + self.delta_weight(name).to(self.base_weight().dtype)
        if not torch.isfinite(merged).all():
            raise AdapterError(
                f"safe_merge: merging adapter {name!r} into {module_name} gives non-finite weights; "
                f"nothing was merged (check the adapter for NaN/inf values)"
            )

    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.hparams and name not in self.merged_adapters:
                self._apply_weight_delta(name, sign=1.0)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_weight_delta(self.merged_adapters.pop(), sign=-1.0)

    @torch.no_grad()
    def _apply_weight_delta(self, name: str, sign: float) -> None:
        if not self.delta_depends_on_weight:
            delta = self.delta_weight(name)
        else:  # after the merge, W has changed and so would ΔW: undo with the very change that was added
            merged = self.__dict__.setdefault("_merged_deltas", {})
            delta = self.delta_weight(name) if sign > 0 else merged.pop(name)
            if sign > 0:
                merged[name] = delta
        weight = self.base_weight()
        weight.data.add_(delta.to(weight.dtype), alpha=sign)


def base_named_modules(module: nn.Module, prefix: str = ""):
    """The user's model as it was: through wrappers into their base, never into adapter parts."""
    yield prefix, module
    if isinstance(module, AdapterLayer):
        children = [("base_layer", module.base_layer)]
    elif isinstance(module, ModulesToSaveWrapper):
        children = [("original_module", module.original_module)]
    else:
        children = list(module.named_children())
    for name, child in children:
        yield from base_named_modules(child, f"{prefix}.{name}" if prefix else name)


def logical_name(module_name: str) -> str:
    """A module path as the user's model names it: without the wrappers' `base_layer` steps."""
    return ".".join(part for part in module_name.split(".") if part != "base_layer")


def wrapper_of(module: nn.Module, layer_cls: type) -> "AdapterLayer | None":
    """The wrapper of class `layer_cls` among the AdapterLayers nested at this module, if any."""
    while isinstance(module, AdapterLayer):
        if type(module) is layer_cls:
            return module
        module = module.base_layer
    return None


def out_features(module: nn.Module) -> int:
    return linear_dims(innermost(module))[1]


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    return module


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy of a whole module per adapter (task heads); the original stays for the base."""

    def __init__(self, module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.adapter_state = state

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str, copy: nn.Module) -> None:
        self.modules_to_save[name] = copy

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def module_for(self, name: str) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def forward(self, x, *args, **kwargs):
        state = self.adapter_state
        if state.disabled:
            return self.original_module(x, *args, **kwargs)
        if state.routing is not None:
            return self._routed(state.routing, x, *args, **kwargs)
        for name in state.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](x, *args, **kwargs)
        return self.original_module(x, *args, **kwargs)

    def _routed(self, routing: Routing, x, *args, **kwargs):
        pieces = []
        for name, rows in routing.groups(x.shape[0], x.device):
            out = self.module_for(name)(x.index_select(0, rows), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise AdapterError(f"mixed-batch routing through {type(self.original_module).__name__} needs a tensor output")
            pieces.append((rows, out))
        result = pieces[0][1].new_empty((x.shape[0],) + tuple(pieces[0][1].shape[1:]))
        for rows, out in pieces:
            result = result.index_copy(0, rows, out)
        return result
