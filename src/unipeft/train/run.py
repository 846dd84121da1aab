"""One training run, end to end: data -> model + adapter -> loop -> adapter files and metrics.json.

    runs/<timestamp>/adapter_config.json        the adapter, in Hugging Face PEFT's layout
    runs/<timestamp>/adapter_model.safetensors  (LoRA factors + the trained classification head)
    runs/<timestamp>/metrics.json               options, split sizes, per-epoch and test results, timing
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from . import data as data_mod
from .errors import UsageError
from .methods import IDPG_METHODS, PROMPT_METHODS, check_method, default_lr, method_config

METRICS_FILE = "metrics.json"


@dataclass
class TrainOptions:
    method: str = "lora"
    model: str | None = None  # Hub name or local folder; None: all-MiniLM-L6-v2 from its package
    data: str | None = None  # CSV/TSV/JSONL file; None: the embedded tweet-sentiment corpus
    text_column: str | None = None  # None: "text"
    label_column: str | None = None  # None: "label" for files, "sentiment" for the embedded corpus
    epochs: int = 3
    lr: float | None = None  # None: the method's default (methods.DEFAULT_LR: 1e-3 LoRA, larger for prompt methods)
    batch_size: int = 32
    max_length: int = 64
    output_dir: str | None = None  # None: runs/<timestamp>
    seed: int = 0  # head and adapter initialisation, batch order
    split_seed: int = 0  # which rows are train / validation / test
    max_train_samples: int | None = 4000  # None: all
    max_eval_samples: int | None = 2000  # for validation and for test; None: all
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_virtual_tokens: int = 20  # prompt methods
    sentence_encoder: str | None = None  # idpg, pg: None is the base model itself ("self")
    target_modules: list[str] | None = None  # None: the model family's default (query, value for BERT)
    bottleneck_size: int | None = None  # houlsby, pfeiffer, parallel, scaled_parallel; None: the preset's (64)
    unified_config: str | None = None  # unified: a JSON file of design-space axes
    axes: dict | None = None  # unified, mam: axes given as flags (--attn-mode ...), over the JSON file's
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    device: str | None = None  # None: cuda when available, else cpu
    progress: bool = True
    total_steps: int | None = None  # not a flag: set by run() to epochs × batches (AdaLoRA's schedule length)


def default_output_dir(root: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    return path


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output path {path} exists and is not a folder")


def _check_numbers(options: TrainOptions) -> None:
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(options, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(options, name)}")
    if options.lr is not None and not options.lr > 0:
        raise UsageError(f"lr must be positive, got {options.lr}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (or None for all), got {value}")


def resolve_device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {requested!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} asked for, but CUDA is not available")
    return device


def _check_room_for_virtual_tokens(options: TrainOptions, model) -> None:
    """Texts are cut at max_length tokens, and a prompt method adds num_virtual_tokens positions in front of
    them: refuse before training when both together overflow a learned position table (MiniLM: 512), which
    would otherwise fail at the first long batch. Models with relative or rotary positions have no such limit."""
    from ..engine.virtual import position_limit

    limit = position_limit(model)
    room = None if limit is None else limit - options.num_virtual_tokens
    if room is not None and options.max_length > room:
        if room < 1:
            raise UsageError(f"{options.num_virtual_tokens} virtual tokens leave no room for text in the model's "
                             f"{limit} positions; choose fewer --num-virtual-tokens")
        raise UsageError(f"max_length {options.max_length} plus {options.num_virtual_tokens} virtual tokens is more "
                         f"than the model's {limit} positions; use --max-length {room} or less (or fewer "
                         f"--num-virtual-tokens)")


def _check_sentence_encoder(options: TrainOptions, tokenizer) -> None:
    """A separate sentence encoder reads the base model's input_ids: it must know every id of the tokenizer and
    (with pg's encoder prompt in front) have positions for the longest text. Checked from its config alone."""
    from transformers import AutoConfig

    name = options.sentence_encoder
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load sentence encoder {name!r}: {first_line}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < len(tokenizer):
        raise UsageError(f"sentence encoder {name!r} has {vocab} tokens but the model's tokenizer has "
                         f"{len(tokenizer)}; it must share the model's tokenizer")
    positions = getattr(config, "max_position_embeddings", None)
    extra = options.num_virtual_tokens if check_method(options.method) == "pg" else 0
    if isinstance(positions, int) and options.max_length + extra > positions:
        raise UsageError(f"sentence encoder {name!r} has {positions} positions, fewer than max_length "
                         f"{options.max_length}" + (f" plus {extra} encoder-prompt tokens" if extra else ""))


def _describe(attached) -> str:
    """What the adapter is attached to, for the log: target modules or virtual tokens (and IDPG's encoder)."""
    if getattr(attached, "attn_mode", None):  # a point of the design space
        return ", ".join(f"{axis}={getattr(attached, axis)}" for axis in ("attn_mode", "attn_option", "attn_bn",
                                                                          "ffn_mode", "ffn_option", "ffn_bn"))
    if getattr(attached, "sites", None):  # a bottleneck adapter: its sites, not every wrapped projection
        return f"{attached.adapter_option} adapter at {' and '.join(attached.sites)}, bottleneck {attached.bottleneck_size}"
    if getattr(attached, "bias_groups", None):
        return f"biases of {attached.bias_groups} ({len(attached.target_modules)} modules)"
    targets = getattr(attached, "target_modules", None)
    if targets:
        return f"target modules: {targets if isinstance(targets, str) else ', '.join(sorted(targets))}"
    where = f"{attached.num_virtual_tokens} virtual tokens"
    encoder = getattr(attached, "sentence_encoder", None)
    if encoder is not None:
        where += f", sentence encoder: {'the model itself' if encoder == 'self' else encoder}"
        if getattr(attached, "learn_encoder_prompt", False):
            where += " with a learned encoder prompt"
    return where


def _attach_adapter(model, config):
    from ..config import ConfigError
    from ..engine.targeting import TargetError
    from ..peft_model import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ConfigError, TargetError) as exc:
        raise UsageError(f"cannot attach the adapter: {exc}") from None


def run(options: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and save; returns the metrics also written to metrics.json."""
    started = time.perf_counter()
    method = check_method(options.method)
    _check_numbers(options)
    output_dir = options.output_dir or default_output_dir()
    _check_output_dir(output_dir)
    # fails on a bad knob before anything slow happens (the run takes at least one step per epoch)
    method_config(dataclasses.replace(options, total_steps=options.epochs))

    dataset = data_mod.load_dataset(options.data, options.text_column, options.label_column, options.split_seed,
                                    options.max_train_samples, options.max_eval_samples)
    log(f"data: {dataset.source}")
    for note in dataset.notes:
        log(f"  note: {note}")
    log(f"  labels: {', '.join(dataset.labels)}")
    log(f"  split (seed {options.split_seed}): {len(dataset.train)} train, {len(dataset.validation)} validation, "
        f"{len(dataset.test)} test")

    import torch

    from .loop import accuracy, make_loader, make_optimizer, make_scheduler, predict, train_epoch
    from .model import check_max_length, load_model, resolve_model

    device = resolve_device(options.device)
    model_name = resolve_model(options.model)
    torch.manual_seed(options.seed)  # the new head and the adapter start from seeded random values
    model, tokenizer = load_model(model_name, dataset.labels)
    check_max_length(options.max_length, tokenizer, model)
    if method in PROMPT_METHODS:
        _check_room_for_virtual_tokens(options, model)
    if method in IDPG_METHODS and options.sentence_encoder:
        _check_sentence_encoder(options, tokenizer)
    train_loader = make_loader(dataset.train, tokenizer, options.batch_size, options.max_length,
                               shuffle=True, seed=options.seed)
    options = dataclasses.replace(options, total_steps=options.epochs * len(train_loader))
    config = method_config(options)
    log(f"model: {model_name} ({type(model).__name__}) on {device}")
    if config is None:  # full fine-tuning, the baseline: the model itself trains and is saved whole
        peft_model = model.requires_grad_(True).to(device)
        trainable = total = sum(p.numel() for p in model.parameters())
        log(f"method: {method} (every weight trains; the whole model and its tokenizer are saved)")
    else:
        peft_model = _attach_adapter(model, config).to(device)
        trainable, total = peft_model.get_nb_trainable_parameters()
        attached = peft_model.active_peft_config  # the family's default targets and the task head filled in
        log(f"method: {method} ({_describe(attached)}; trained and saved head: "
            f"{', '.join(attached.modules_to_save or []) or 'none'})")
    log(f"trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)")

    val_loader = make_loader(dataset.validation, tokenizer, options.batch_size, options.max_length)
    test_loader = make_loader(dataset.test, tokenizer, options.batch_size, options.max_length)
    lr = options.lr if options.lr is not None else default_lr(method)
    optimizer = make_optimizer(peft_model, lr, options.weight_decay)
    scheduler = make_scheduler(optimizer, options.epochs * len(train_loader), options.warmup_ratio)

    epochs = []
    train_started = time.perf_counter()
    for epoch in range(1, options.epochs + 1):
        loss = train_epoch(peft_model, train_loader, optimizer, scheduler, device,
                           description=f"epoch {epoch}/{options.epochs}", progress=options.progress,
                           first_step=(epoch - 1) * len(train_loader))
        val_accuracy = accuracy(predict(peft_model, val_loader, device), dataset.validation)
        epochs.append({"epoch": epoch, "train_loss": loss, "validation_accuracy": val_accuracy})
        log(f"epoch {epoch}/{options.epochs}: train loss {loss:.4f}, validation accuracy {val_accuracy:.4f}")
    train_seconds = time.perf_counter() - train_started

    test_accuracy = accuracy(predict(peft_model, test_loader, device), dataset.test)
    majority = data_mod.majority_label(dataset.train)
    majority_accuracy = sum(e.label == majority for e in dataset.test) / len(dataset.test)
    log(f"test accuracy: {test_accuracy:.4f} (majority-class baseline, always {dataset.labels[majority]!r}: "
        f"{majority_accuracy:.4f})")

    peft_model.save_pretrained(output_dir)
    if config is None:
        tokenizer.save_pretrained(output_dir)
    metrics = {
        "method": method,
        "model": model_name,
        "data": dataset.source,
        "labels": dataset.labels,
        "num_train": len(dataset.train),
        "num_validation": len(dataset.validation),
        "num_test": len(dataset.test),
        "epochs": epochs,
        "validation_accuracy": epochs[-1]["validation_accuracy"],
        "test_accuracy": test_accuracy,
        "majority_label": dataset.labels[majority],
        "majority_baseline": majority_accuracy,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "lr": lr,
        "steps": options.total_steps,
        "device": str(device),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "options": dataclasses.asdict(options) | {"output_dir": output_dir},
    }
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(output_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    log(f"saved {'model' if config is None else 'adapter'} and {METRICS_FILE} to {output_dir} ({metrics['total_seconds']:.0f} s in all, "
        f"{train_seconds:.0f} s training)")
    return metrics
