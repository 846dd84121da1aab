"""unipeft: parameter-efficient fine-tuning under one design space, checkpoint-compatible with HF PEFT.

Names are imported lazily so that `import unipeft` does not pay for torch and transformers until used.
"""
from __future__ import annotations

import importlib
from typing import Any

from .compat import warn_if_untested

__version__ = "0.1.0"
warn_if_untested()

_EXPORTS = {
    "PeftConfig": "config", "TaskType": "config", "get_peft_config": "config", "ConfigError": "config",
    "PeftType": "registry", "register_method": "registry", "MethodSpec": "registry",
    "LoraConfig": "methods.lora", "LoHaConfig": "methods.loha",
    "LoKrConfig": "methods.lokr", "OFTConfig": "methods.oft", "AdaLoraConfig": "methods.adalora",
    "AdaLoraCallback": "callbacks",
    "IA3Config": "methods.ia3",
    "BitFitConfig": "methods.bitfit",
    "PromptTuningConfig": "methods.prompt", "PromptEncoderConfig": "methods.prompt", "PromptTuningInit": "methods.prompt",
    "PromptEncoderReparameterizationType": "methods.prompt", "PromptLearningConfig": "methods.prompt",
    "PrefixTuningConfig": "methods.prefix",
    "IDPGConfig": "methods.idpg",
    "BottleneckConfig": "methods.bottleneck", "HoulsbyConfig": "methods.bottleneck", "PfeifferConfig": "methods.bottleneck",
    "ParallelAdapterConfig": "methods.bottleneck", "ScaledParallelAdapterConfig": "methods.bottleneck",
    "UnifiedConfig": "methods.unified", "MAMConfig": "methods.unified",
    "PeftModel": "peft_model", "get_peft_model": "peft_model",
    "PeftModelForSequenceClassification": "peft_model", "PeftModelForCausalLM": "peft_model",
    "PeftModelForSeq2SeqLM": "peft_model", "PeftModelForTokenClassification": "peft_model",
    "PeftModelForFeatureExtraction": "peft_model", "PeftModelForQuestionAnswering": "peft_model",
    "AdapterModel": "engine.inject", "CheckpointMismatchError": "engine.inject",
    "AdapterError": "engine.layers", "TargetError": "engine.targeting", "CheckpointError": "engine.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unipeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
