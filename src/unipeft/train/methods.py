"""Which adapter `unipeft train --method NAME` attaches: one config builder per method name.

Putting a method on the command line is one entry in `METHODS`; the builder reads the shared
method knobs (`r`, `alpha`, `dropout`, `target_modules`) from the run's options.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .errors import UsageError

if TYPE_CHECKING:
    from ..config import PeftConfig
    from .run import TrainOptions


def _lora(options: "TrainOptions") -> "PeftConfig":
    from ..methods.lora import LoraConfig

    # target_modules=None takes the model family's default (query and value for BERT-style models);
    # the classification head is trained and saved with the adapter (task_type SEQ_CLS).
    return LoraConfig(task_type="SEQ_CLS", r=options.r, lora_alpha=options.alpha,
                      lora_dropout=options.dropout, target_modules=options.target_modules)


def _prompt(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prompt import PromptTuningConfig

    return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=options.num_virtual_tokens)


def _ptuning(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prompt import PromptEncoderConfig

    return PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=options.num_virtual_tokens)


def _prefix(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prefix import PrefixTuningConfig

    return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=options.num_virtual_tokens)


METHODS: dict[str, Callable[["TrainOptions"], "PeftConfig"]] = {
    "lora": _lora,
    "prompt": _prompt,
    "ptuning": _ptuning,
    "prefix": _prefix,
}

# Prompt methods move a few vectors a long way: they need a far larger step than weight-level methods.
DEFAULT_LR = {"lora": 1e-3}
PROMPT_LR = 3e-2


def default_lr(method: str) -> float:
    return DEFAULT_LR.get(check_method(method), PROMPT_LR)


def known_methods() -> list[str]:
    return sorted(METHODS)


def check_method(name: str) -> str:
    key = name.strip().lower()
    if key not in METHODS:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return key


def method_config(options: "TrainOptions") -> "PeftConfig":
    """The adapter config for the run; a bad knob (e.g. r=0) becomes a UsageError naming it."""
    from ..config import ConfigError

    builder = METHODS[check_method(options.method)]
    try:
        return builder(options)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
