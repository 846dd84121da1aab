"""The training loop's options (`LoopOptions`), their checks, and the learning-rate schedule they describe."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .accelerator import FP16_ON_CPU
from .engines import resolve_engine
from .errors import UsageError

SCHEDULES = ("linear", "cosine", "constant")  # the learning-rate schedules (after warm-up)
PRECISIONS = ("no", "bf16", "fp16")  # the mixed_precision values


@dataclass
class LoopOptions:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06  # fraction of optimizer steps; warmup_steps overrides when set
    warmup_steps: int | None = None
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (after warm-up)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps between checkpoint points; None: at the end of each epoch
    early_stopping: int | None = None  # stop after this many evaluations without improving main_metric; None: off
    mixed_precision: str = "no"  # "no" | "bf16" (autocast, also on CPU) | "fp16" (GPU only)
    seed: int = 0
    log_every: int = 10  # optimizer steps between training-loss records in log.jsonl
    progress: bool = True
    device: str | None = None  # None: let Accelerate choose; "cpu" forces CPU
    engine: str | None = None  # "ddp" | "fsdp" | a DeepSpeed JSON file | None: from accelerate launch (engines.py)


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step `step` of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def warmup_steps(options: LoopOptions, total: int) -> int:
    if options.warmup_steps is not None:
        return options.warmup_steps
    return max(1, math.ceil(total * options.warmup_ratio)) if options.warmup_ratio > 0 else 0


def check_options(options: LoopOptions) -> None:
    """UsageError for any LoopOptions value the loop cannot run with; nothing is loaded or written first."""
    for name in ("epochs", "batch_size", "grad_accum", "log_every"):
        if getattr(options, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(options, name)}")
    for name in ("eval_every", "early_stopping"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (or None), got {value}")
    if options.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {options.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if options.mixed_precision not in PRECISIONS:
        raise UsageError(f"unknown mixed_precision {options.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not 0 <= options.warmup_ratio <= 1:
        raise UsageError(f"warmup_ratio must be between 0 and 1, got {options.warmup_ratio}")
    if options.warmup_steps is not None and options.warmup_steps < 0:
        raise UsageError(f"warmup_steps must be at least 0, got {options.warmup_steps}")
    if not options.lr > 0:
        raise UsageError(f"lr must be positive, got {options.lr}")
    if not options.weight_decay >= 0:
        raise UsageError(f"weight_decay must be at least 0, got {options.weight_decay}")
    if options.max_grad_norm is not None and not options.max_grad_norm > 0:
        raise UsageError(f"max_grad_norm must be positive (or None: no clipping), got {options.max_grad_norm}")
    if options.early_stopping is not None and options.eval_every is None and options.epochs < 2:
        raise UsageError("--early-stopping needs several evaluations: more than one epoch, or --eval-every N")
    if options.mixed_precision == "fp16" and (options.device == "cpu"
                                              or options.device is None and not torch.cuda.is_available()):
        raise UsageError(FP16_ON_CPU)
    resolve_engine(options.engine)
