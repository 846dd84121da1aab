"""Which adapter `unipeft train --method NAME` attaches: one config builder per method name.

Putting a method on the command line is one entry in `METHODS`; the builder reads the shared
method knobs (`r`, `alpha`, `dropout`, `target_modules`, `num_virtual_tokens`, `sentence_encoder`,
`bottleneck_size`, the design-space axes) from the run's options, and `DEFAULT_LR` holds the learning
rate it trains with unless `--lr` is given.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

from .errors import UsageError

if TYPE_CHECKING:
    from ..config import PeftConfig
    from .run import TrainOptions


def _full(options: "TrainOptions") -> None:
    return None  # no adapter: every weight of the model trains, and the whole model is saved


def _lora(options: "TrainOptions") -> "PeftConfig":
    from ..methods.lora import LoraConfig

    # target_modules=None takes the model family's default (query and value for BERT-style models);
    # for classification the head is trained and saved with the adapter (task_type SEQ_CLS).
    return LoraConfig(task_type=options.task_type, r=options.r, lora_alpha=options.alpha,
                      lora_dropout=options.dropout, target_modules=options.target_modules)


def _dora(options: "TrainOptions") -> "PeftConfig":
    from ..methods.lora import LoraConfig

    return LoraConfig(task_type=options.task_type, r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.target_modules, use_dora=True)


def _loha(options: "TrainOptions") -> "PeftConfig":
    from ..methods.loha import LoHaConfig

    return LoHaConfig(task_type=options.task_type, r=options.r, alpha=options.alpha, target_modules=options.target_modules)


def _lokr(options: "TrainOptions") -> "PeftConfig":
    from ..methods.lokr import LoKrConfig

    return LoKrConfig(task_type=options.task_type, r=options.r, alpha=options.alpha, target_modules=options.target_modules)


def _oft(options: "TrainOptions") -> "PeftConfig":
    from ..methods.oft import OFTConfig

    # HF PEFT's default: blocks of 32 (MiniLM's 384 features make 12 rotations per layer); --r is not read
    return OFTConfig(task_type=options.task_type, r=0, oft_block_size=32, target_modules=options.target_modules)


def _adalora(options: "TrainOptions") -> "PeftConfig":
    from ..methods.adalora import AdaLoraConfig

    # --r is the final average rank; training starts from 1.5× as many triplets (the paper's 12 -> 8),
    # keeps them for the first 10% of steps and fine-tunes the final ranks for the last 20%
    steps = options.total_steps
    return AdaLoraConfig(task_type=options.task_type, target_r=options.r, init_r=math.ceil(1.5 * options.r),
                         lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=options.target_modules,
                         total_step=steps, tinit=steps // 10, tfinal=steps // 5)


def _prompt(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prompt import PromptTuningConfig

    return PromptTuningConfig(task_type=options.task_type, num_virtual_tokens=options.num_virtual_tokens)


def _ptuning(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prompt import PromptEncoderConfig

    return PromptEncoderConfig(task_type=options.task_type, num_virtual_tokens=options.num_virtual_tokens)


def _prefix(options: "TrainOptions") -> "PeftConfig":
    from ..methods.prefix import PrefixTuningConfig

    return PrefixTuningConfig(task_type=options.task_type, num_virtual_tokens=options.num_virtual_tokens)


def _idpg(options: "TrainOptions", learn_encoder_prompt: bool = False) -> "PeftConfig":
    from ..methods.idpg import SELF, IDPGConfig

    # The generator keeps its own defaults (hidden size 384, dropout 0.1); the sentence encoder is the base
    # model itself unless --sentence-encoder names a model that shares its tokenizer.
    encoder = os.path.expanduser(options.sentence_encoder) if options.sentence_encoder else SELF
    return IDPGConfig(task_type=options.task_type, num_virtual_tokens=options.num_virtual_tokens, sentence_encoder=encoder,
                      learn_encoder_prompt=learn_encoder_prompt)


def _pg(options: "TrainOptions") -> "PeftConfig":
    """IDPG's "PG" variant: t learned vectors are also prepended to the sentence encoder's input."""
    return _idpg(options, learn_encoder_prompt=True)


def _bottleneck(preset: str) -> Callable[["TrainOptions"], "PeftConfig"]:
    def build(options: "TrainOptions") -> "PeftConfig":
        from ..methods import bottleneck

        size = {"bottleneck_size": options.bottleneck_size} if options.bottleneck_size else {}
        return getattr(bottleneck, preset)(task_type=options.task_type, adapter_dropout=options.dropout, **size)
    return build


def _mam(options: "TrainOptions") -> "PeftConfig":
    from ..methods.unified import MAMConfig

    # The GLUE-size variant (prefix l = 16, adapter r = 64) suits a 22M-parameter classifier; flags override it.
    return MAMConfig.for_glue(task_type=options.task_type, **(options.axes or {}))


def _ia3(options: "TrainOptions") -> "PeftConfig":
    from ..methods.ia3 import IA3Config

    return IA3Config(task_type=options.task_type, target_modules=options.target_modules)


def _bitfit(options: "TrainOptions") -> "PeftConfig":
    from ..methods.bitfit import BitFitConfig

    return BitFitConfig(task_type=options.task_type)


def _unified(options: "TrainOptions") -> "PeftConfig":
    from ..methods.unified import AXES, UnifiedConfig

    axes = {}
    if options.unified_config:
        axes = read_json_object(options.unified_config, "--unified-config")
        unknown = sorted(set(axes) - set(AXES) - {"task_type", "peft_type", "layers_to_transform"})
        if unknown:
            raise UsageError(f"--unified-config {options.unified_config} must hold a JSON object of design-space axes "
                             f"({', '.join(AXES)}); unknown keys: {unknown}")
    axes = {**axes, **(options.axes or {}), "task_type": options.task_type}
    axes.pop("peft_type", None)
    return UnifiedConfig(**axes)


METHODS: dict[str, Callable[["TrainOptions"], "PeftConfig | None"]] = {
    "full": _full,  # the baseline
    "lora": _lora,
    "dora": _dora,
    "loha": _loha,
    "lokr": _lokr,
    "oft": _oft,
    "adalora": _adalora,
    "prompt": _prompt,
    "ptuning": _ptuning,
    "prefix": _prefix,
    "idpg": _idpg,
    "pg": _pg,
    "houlsby": _bottleneck("HoulsbyConfig"),
    "pfeiffer": _bottleneck("PfeifferConfig"),
    "parallel": _bottleneck("ParallelAdapterConfig"),
    "scaled_parallel": _bottleneck("ScaledParallelAdapterConfig"),
    "mam": _mam,
    "ia3": _ia3,
    "bitfit": _bitfit,
    "unified": _unified,
}
PROMPT_METHODS = frozenset({"prompt", "ptuning", "prefix", "idpg", "pg"})  # they add virtual tokens
IDPG_METHODS = frozenset({"idpg", "pg"})  # they read --sentence-encoder

# Prompt methods move a few vectors a long way: they need a far larger step than weight-level methods.
# Each prompt method's rate was picked from 3-5 tried on the embedded default (MiniLM + tweets; validation
# accuracy after 126 steps, training loss on ties; README, "Prompt methods on the embedded default").
# IDPG's generator is a 3M-parameter MLP, not a table of vectors: it trains with a smaller step.
# The adapters, IA3, BitFit and MAM were picked the same way (README, "Adapters, IA3 and BitFit on the
# embedded default"), and the LoRA variants too (README, "LoRA variants on the embedded default").
DEFAULT_LR = {
    "full": 5e-5,  # BERT's fine-tuning range (2e-5 to 5e-5), the top end for the short default run; not swept
    "lora": 1e-3,
    "dora": 3e-3,
    "loha": 1e-2,
    "lokr": 1e-2,
    "oft": 1e-2,
    "adalora": 3e-2,  # its E starts at 0 and the update is scaled by alpha / init_r
    "prompt": 1e-1,
    "ptuning": 1e-1,
    "prefix": 1e-1,
    "idpg": 3e-3,
    "pg": 3e-3,
    "houlsby": 3e-3,
    "pfeiffer": 3e-3,
    "parallel": 3e-3,
    "scaled_parallel": 1e-3,  # its output is scaled by 4: the same step as the parallel adapter's 3e-3, roughly
    "mam": 1e-3,
    "ia3": 3e-2,  # scaling vectors near 1 move little per step
    "bitfit": 1e-2,
    "unified": 1e-3,  # a starting point for any point of the design space, not tuned per point
}
assert set(DEFAULT_LR) == set(METHODS), "every method needs a default learning rate"


def default_lr(method: str) -> float:
    return DEFAULT_LR[check_method(method)]


def lr_help() -> str:
    """The defaults for --lr's help, grouped: '1e-3 for lora, 3e-2 for prompt, ...'."""
    groups: dict[float, list[str]] = {}
    for name in METHODS:
        groups.setdefault(DEFAULT_LR[name], []).append(name)
    return ", ".join(f"{lr:g} for {'/'.join(names)}" for lr, names in groups.items())


def known_methods() -> list[str]:
    return sorted(METHODS)


def check_method(name: str) -> str:
    key = name.strip().lower()
    if key not in METHODS:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return key


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


def method_config(options: "TrainOptions") -> "PeftConfig | None":
    """The adapter config for the run (None for full fine-tuning), with --method-config's fields over it;
    a bad knob (e.g. r=0) becomes a UsageError."""
    from ..config import ConfigError

    builder = METHODS[check_method(options.method)]
    try:
        config = builder(options)
        if options.method_config:
            if config is None:
                raise UsageError("--method-config sets adapter fields, but --method full trains the model itself")
            config = _with_overrides(config, options.method_config)
        return config
    except (ConfigError, TypeError) as exc:
        raise UsageError(f"--method {options.method}: {exc}") from None
