"""unipeft: parameter-efficient fine-tuning under one design space, checkpoint-compatible with HF PEFT.

Names are imported lazily so that `import unipeft` does not pay for torch and transformers until used.
"""
from __future__ import annotations

import importlib
from typing import Any

from .compat import warn_if_untested

__version__ = "0.1.0"
warn_if_untested()

# The package's own names; each method module's public names (its `__all__`) come from the registry.
_EXPORTS = {
    "PeftConfig": "config", "TaskType": "config", "get_peft_config": "config", "ConfigError": "config",
    "PeftType": "registry", "register_method": "registry", "MethodSpec": "registry",
    "register_preset": "registry", "Preset": "registry", "Knobs": "registry",
    "AdaLoraCallback": "callbacks",
    "PeftModel": "peft_model", "get_peft_model": "peft_model",
    "PeftModelForSequenceClassification": "peft_model", "PeftModelForCausalLM": "peft_model",
    "PeftModelForSeq2SeqLM": "peft_model", "PeftModelForTokenClassification": "peft_model",
    "PeftModelForFeatureExtraction": "peft_model", "PeftModelForQuestionAnswering": "peft_model",
    "AdapterModel": "engine.inject", "CheckpointMismatchError": "engine.inject",
    "AdapterError": "engine.layers", "TargetError": "engine.targeting", "CheckpointError": "engine.checkpoint",
}


def _all_exports() -> dict[str, str]:
    from .registry import exports

    return {**{name: f"{__name__}.{module}" for name, module in _EXPORTS.items()}, **exports()}


def __getattr__(name: str) -> Any:
    if name == "__all__":  # `from unipeft import *`: computed on demand, it imports the method modules
        return sorted(_all_exports())
    module = _EXPORTS.get(name)
    module = f"{__name__}.{module}" if module else None if name.startswith("__") else _all_exports().get(name)
    if module is None:
        raise AttributeError(f"module 'unipeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(_all_exports())
