"""Which adapter `unipeft train --method NAME` attaches: the registry's presets (each method file declares
its own: name, default learning rate, builder), plus `full`, the baseline without an adapter.

The default rates were picked on the embedded default (MiniLM + tweets) from 3-5 tried per method: README,
"Prompt methods on the embedded default", "Adapters, IA3 and BitFit on the embedded default" and "LoRA
variants on the embedded default".
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..registry import Knobs, Preset, presets
from .errors import UsageError

if TYPE_CHECKING:
    from ..config import PeftConfig
    from .plan import TrainOptions

# BERT's fine-tuning range (2e-5 to 5e-5), the top end for the short default run; not swept
FULL = Preset("full", 5e-5, lambda knobs: None, "full fine-tuning, the baseline: every weight trains and the whole "
              "model and tokenizer are saved")


def method_presets() -> dict[str, Preset]:
    return {"full": FULL, **presets()}


def default_lr(method: str) -> float:
    return method_presets()[check_method(method)].lr


def lr_help(code: str = "") -> str:
    """The defaults for --lr's help, grouped: '5e-05 for full, 0.001 for lora/mam, ...' (names wrapped in
    `code`, e.g. a backtick for Markdown)."""
    groups: dict[float, list[str]] = {}
    for preset in method_presets().values():
        groups.setdefault(preset.lr, []).append(f"{code}{preset.name}{code}")
    return ", ".join(f"{lr:g} for {'/'.join(names)}" for lr, names in groups.items())


def methods_help() -> str:
    """Every method with its one-line summary, for the README: '`full` (full fine-tuning, ...), `lora`, ...'."""
    return ", ".join(f"`{p.name}`" + (f" ({p.summary})" if p.summary else "") for p in method_presets().values())


def known_methods() -> list[str]:
    return sorted(method_presets())


def check_method(name: str) -> str:
    key = name.strip().lower()
    if key not in method_presets():
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return key


def knobs(options: "TrainOptions", task_type: str, total_steps: int) -> Knobs:
    """The method settings of a run; design-space axes from --unified-config, with the flags' over them."""
    axes = read_json_object(options.unified_config, "--unified-config") if options.unified_config else {}
    axes.update(options.axes or {})
    return Knobs(task_type=task_type, r=options.r, alpha=options.alpha, dropout=options.dropout,
                 target_modules=options.target_modules, num_virtual_tokens=options.num_virtual_tokens,
                 sentence_encoder=options.sentence_encoder, bottleneck_size=options.bottleneck_size,
                 axes=axes or None, total_steps=total_steps)


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in `path` (a user's file: `what` names it in the error, e.g. --method-config)."""
    from ..config import ConfigError, read_config_json

    try:
        return read_config_json(os.path.expanduser(path), what)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _with_overrides(config: "PeftConfig", path: str) -> "PeftConfig":
    """The builder's config with the fields of a --method-config JSON object (HF PEFT field names) set over it."""
    import dataclasses

    data = read_json_object(path, "--method-config")
    fields = {f.name for f in dataclasses.fields(config) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UsageError(f"--method-config {path}: {type(config).__name__} has no field(s) {unknown}; "
                         f"its fields: {', '.join(sorted(fields - {'peft_type'}))}")
    if str(data.pop("peft_type", config.peft_type)) != str(config.peft_type):
        raise UsageError(f"--method-config {path} is for another method: its peft_type is not {config.peft_type}")
    return dataclasses.replace(config, **data)


def method_config(options: "TrainOptions", task_type: str = "SEQ_CLS", total_steps: int = 1) -> "PeftConfig | None":
    """The adapter config for the run (None for full fine-tuning), with --method-config's fields over it;
    a bad knob (e.g. r=0) becomes a UsageError. `total_steps`: the run's optimizer steps (AdaLoRA's schedule)."""
    from ..config import ConfigError

    preset = method_presets()[check_method(options.method)]
    try:
        config = preset.build(knobs(options, task_type, total_steps))
        if options.method_config:
            if config is None:
                raise UsageError("--method-config sets adapter fields, but --method full trains the model itself")
            config = _with_overrides(config, options.method_config)
        return config
    except (ConfigError, TypeError) as exc:
        raise UsageError(f"--method {options.method}: {exc}") from None
