"""Method registry: peft_type -> (config class, adapter layer factory, parameter prefix).

Adding a method is one line in `METHOD_MODULES` plus its file under `methods/`, which calls
`register_method` when imported. Nothing else in the engine changes.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

METHOD_MODULES: dict[str, str] = {
    "LORA": "unipeft.methods.lora",
    "IA3": "unipeft.methods.ia3",
    "PROMPT_TUNING": "unipeft.methods.prompt",
    "P_TUNING": "unipeft.methods.prompt",
    "PREFIX_TUNING": "unipeft.methods.prefix",
    "IDPG": "unipeft.methods.idpg",
    "BITFIT": "unipeft.methods.bitfit",
    "BOTTLENECK": "unipeft.methods.bottleneck",
    "UNIFIED": "unipeft.methods.unified",
    "CROSS_PREFIX": "unipeft.methods.cross_prefix",
    "LOHA": "unipeft.methods.loha",
    "LOKR": "unipeft.methods.lokr",
    "OFT": "unipeft.methods.oft",
    "ADALORA": "unipeft.methods.adalora",
}

PeftType = enum.Enum("PeftType", {name: name for name in METHOD_MODULES}, type=str)
PeftType.__str__ = lambda self: self.value  # type: ignore[method-assign]


@dataclass(frozen=True)
class MethodSpec:
    peft_type: str
    config_cls: type
    # Returns the AdapterLayer subclass that wraps `module` for this config, or None if the
    # method cannot attach to this kind of module. None for methods that add virtual inputs instead.
    layer_for: Optional[Callable]
    prefix: str  # start of the parameter names this method adds ("lora_"), for readers and filters
    site_key: str  # which default-target list of the family site table the method uses
    # For prompt methods: (model, resolved config) -> engine.virtual.VirtualInput holding its tensors
    build_virtual: Optional[Callable] = None
    # For union configs (the design space): (config, model) -> the plain method configs it is made of
    components: Optional[Callable] = None
    # (adapter_model, adapter name) -> a term added to the model's loss while the adapter trains
    loss_term: Optional[Callable] = None
    # (adapter_model, adapter name, global step) -> None, after each optimizer step (AdaLoRA's rank schedule)
    after_optimizer_step: Optional[Callable] = None
    # (adapter_model, adapter name) -> dict of tensors and numbers that after_optimizer_step keeps between steps,
    # and (adapter_model, adapter name, that dict) -> None to restore it: an interrupted run resumes exactly
    step_state: Optional[Callable] = None
    load_step_state: Optional[Callable] = None


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    _METHODS[spec.peft_type] = spec


def known_peft_types() -> list[str]:
    return sorted(METHOD_MODULES)


def get_method(peft_type: str) -> MethodSpec:
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in METHOD_MODULES:
        from .config import ConfigError

        raise ConfigError(f"unknown peft_type {peft_type!r}; choose one of {known_peft_types()}")
    if key not in _METHODS:
        importlib.import_module(METHOD_MODULES[key])
    return _METHODS[key]
