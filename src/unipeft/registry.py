"""Method registry: peft_type -> (config class, adapter layer factory, parameter prefix), and the
`unipeft train --method` presets.

Adding a method is one line in `METHOD_MODULES` plus its file under `methods/`, which, when imported, calls
`register_method` for each peft_type it implements and `register_preset` for each name `unipeft train
--method` knows it by, and lists its public names in `__all__` (they become `unipeft.<name>`). Nothing else
in the engine, the command line or the package's exports changes.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    from .config import PeftConfig

METHOD_MODULES: dict[str, str] = {
    "LORA": "unipeft.methods.lora",
    "LOHA": "unipeft.methods.loha",
    "LOKR": "unipeft.methods.lokr",
    "OFT": "unipeft.methods.oft",
    "ADALORA": "unipeft.methods.adalora",
    "PROMPT_TUNING": "unipeft.methods.prompt",
    "P_TUNING": "unipeft.methods.prompt",
    "PREFIX_TUNING": "unipeft.methods.prefix",
    "IDPG": "unipeft.methods.idpg",
    "BOTTLENECK": "unipeft.methods.bottleneck",
    "UNIFIED": "unipeft.methods.unified",
    "CROSS_PREFIX": "unipeft.methods.cross_prefix",
    "IA3": "unipeft.methods.ia3",
    "BITFIT": "unipeft.methods.bitfit",
    "LN_TUNING": "unipeft.methods.ln_tuning",
    "VERA": "unipeft.methods.vera",
}

PeftType = enum.Enum("PeftType", {name: name for name in METHOD_MODULES}, type=str)
PeftType.__str__ = lambda self: self.value  # type: ignore[method-assign]


@dataclass(frozen=True)
class MethodSpec:
    peft_type: str
    config_cls: type
    # Returns the AdapterLayer subclass that wraps `module` for this config, or None if the
    # method cannot attach to this kind of module. None for methods that only add a model part (prompts).
    layer_for: Optional[Callable]
    prefix: str  # start of the parameter names this method adds ("lora_"), for readers and filters
    # model_type -> the modules it adapts when target_modules is not given (HF PEFT's defaults per family)
    default_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
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
    # (adapter_model, adapters, weights, new name, combination_type, svd_rank) -> None: PeftModel.add_weighted_adapter
    add_weighted_adapter: Optional[Callable] = None
    # (model, resolved config, planned layers) -> engine.model_parts.ModelPart: what one adapter holds once at the
    # model level (a prompt method's virtual.inputs.VirtualInput, VeRA's shared projections); layers reach it in
    # `attach` through adapter_model.part_of(name)
    model_part: Optional[Callable] = None


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


@dataclass(frozen=True)
class Knobs:
    """The method settings `unipeft train` takes as flags; each preset reads the ones it needs."""
    task_type: Optional[str] = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # None: the model family's default (query, value for BERT)
    num_virtual_tokens: int = 20
    sentence_encoder: Optional[str] = None  # None: the base model itself
    bottleneck_size: Optional[int] = None  # None: the preset's own
    axes: Optional[dict] = None  # design-space axes (unified, mam)
    total_steps: int = 1  # the run's optimizer steps (AdaLoRA's schedule)


@dataclass(frozen=True)
class Preset:
    """`unipeft train --method NAME`: the config it builds from the run's knobs and the rate it trains at."""
    name: str
    lr: float  # the default learning rate (README: each method's rate sweep on the embedded default)
    build: Callable[[Knobs], "PeftConfig"]
    summary: str  # one line: what the preset attaches, for --help and the README


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> None:
    _PRESETS[preset.name] = preset


def method_modules() -> list[Any]:
    """Every method module, imported (they register their methods and presets as they load)."""
    return [importlib.import_module(module) for module in dict.fromkeys(METHOD_MODULES.values())]


def presets() -> dict[str, Preset]:
    """Every `unipeft train --method` preset, in the order of `METHOD_MODULES` (whatever order the modules
    were imported in), then each module's own order."""
    order = [module.__name__ for module in method_modules()]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(_PRESETS.items(), key=lambda item: rank.get(item[1].build.__module__, len(order))))


def exports() -> dict[str, str]:
    """Public name -> method module, from each module's `__all__`."""
    return {name: module.__name__ for module in method_modules() for name in module.__all__}
