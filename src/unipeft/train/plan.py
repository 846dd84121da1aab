"""What one `unipeft train` run does, decided and checked once before anything loads.

    plan = plan_run(TrainOptions(method="lora", epochs=2))   # UsageError for any bad option; nothing loaded or written

A RunPlan is frozen and flows one way: options -> plan -> data, model and method -> fit (run.py). It holds
the checked method name, device, engine, the training loop's options (the method's default rate filled in)
and the run folder.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

METRICS_FILE = "metrics.json"
EVAL_MODES = ("sft", "icl")


@dataclass
class TrainOptions:
    method: str = "lora"
    task: str | None = None  # a registered task (tasks.TASKS); None: the embedded tweets, or --data as a classification file
    model: str | None = None  # Hub name or local folder; None: all-MiniLM-L6-v2 from its package
    data: str | None = None  # one CSV/TSV/JSONL file, split 80/10/10; None: the task's own data
    train_file: str | None = None  # or the splits as separate files
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None  # None: the task's ("text" for files without --task)
    pair_column: str | None = None  # second sentence of pair tasks
    label_column: str | None = None  # None: the task's ("label" for files, "sentiment" for the embedded corpus)
    target_column: str | None = None  # generation tasks' reference output
    direction: str | None = None  # translation: en-ro or ro-en
    eval_mode: str = "sft"  # sft: the fine-tuned model on the instance alone; icl: a causal LM with `shots` examples in its prompt
    shots: int = 4
    search: str = "greedy"  # generation: greedy or beam
    num_beams: int = 4
    max_new_tokens: int | None = None  # None: the task's default
    max_target_length: int = 64  # tokens of a generation target in training
    epochs: int = 3
    lr: float | None = None  # None: the method's default (its preset's: 1e-3 LoRA, larger for prompt methods)
    batch_size: int = 32
    grad_accum: int = 1
    schedule: str = "linear"  # after warm-up: linear, cosine or constant
    max_length: int = 64
    output_dir: str | None = None  # None: runs/<timestamp>
    resume: bool = False  # continue the run in output_dir from its checkpoint
    seed: int = 0  # head and adapter initialisation, batch order
    split_seed: int = 0  # which rows are train / validation / test
    max_train_samples: int | None = 4000  # None: all
    max_eval_samples: int | None = 2000  # for validation and for test; None: all
    eval_every: int | None = None  # optimizer steps; None: each epoch's end
    early_stopping: int | None = None  # evaluations without improvement before stopping; None: off
    precision: str = "no"  # mixed precision: no, bf16 or fp16
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_virtual_tokens: int = 20  # prompt methods
    sentence_encoder: str | None = None  # idpg, pg: None is the base model itself ("self")
    target_modules: list[str] | None = None  # None: the model family's default (query, value for BERT)
    bottleneck_size: int | None = None  # houlsby, pfeiffer, parallel, scaled_parallel; None: the preset's (64)
    unified_config: str | None = None  # unified: a JSON file of design-space axes
    axes: dict | None = None  # unified, mam: axes given as flags (--attn-mode ...), over the JSON file's
    method_config: str | None = None  # a JSON object of the method config's fields, set over the built config
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    device: str | None = None  # None: cuda when available, else cpu
    engine: str | None = None  # ddp, fsdp, or a DeepSpeed JSON file; None: what `accelerate launch` chose (engines.py)
    progress: bool = True


# What --resume may change: where and how it runs and reports, how it evaluates. Everything else decides the
# data, the model or the training, and must be what the checkpoint was written with.
RESUME_MAY_CHANGE = ("output_dir", "resume", "progress", "device", "precision", "eval_every", "early_stopping",
                     "search", "num_beams", "max_new_tokens")


@dataclass(frozen=True)
class RunPlan:
    options: TrainOptions  # a copy: changing the caller's object later changes nothing here
    method: str  # the preset's name, normalised
    device: Any  # torch.device
    engine: Any  # engines.Engine
    loop: Any  # trainer.LoopOptions, checked
    output_dir: str

    @property
    def fixed_on_resume(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k not in RESUME_MAY_CHANGE}


def plan_run(options: TrainOptions) -> RunPlan:
    """Every option a run reads, checked before anything loads or is written."""
    from .engines import resolve_engine
    from .methods import check_method, default_lr
    from .loop_options import LoopOptions, check_options

    method = check_method(options.method)
    _check_values(options)
    device = resolve_device(options.device)  # an unknown or missing device fails before anything loads
    lr = options.lr if options.lr is not None else default_lr(method)
    loop = LoopOptions(epochs=options.epochs, batch_size=options.batch_size, lr=lr, weight_decay=options.weight_decay,
                       warmup_ratio=options.warmup_ratio, schedule=options.schedule, grad_accum=options.grad_accum,
                       eval_every=options.eval_every, early_stopping=options.early_stopping,
                       mixed_precision=options.precision, seed=options.seed, progress=options.progress,
                       device=device.type, engine=options.engine)
    check_options(loop)
    if num_processes() > 1 and not options.output_dir:
        raise UsageError("several processes must agree on the run folder: pass --output-dir")
    output_dir = options.output_dir or default_output_dir()
    _check_output_dir(output_dir, options.resume)
    return RunPlan(dataclasses.replace(options), method, device, resolve_engine(options.engine), loop, output_dir)


def _check_values(options: TrainOptions) -> None:
    """The options of data, evaluation and decoding (the loop's own are trainer.check_options')."""
    from .generation import SEARCHES

    for name in ("max_length", "num_beams", "max_target_length"):
        if getattr(options, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(options, name)}")
    for name in ("max_train_samples", "max_eval_samples", "max_new_tokens"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (or None), got {value}")
    if options.shots < 0:
        raise UsageError(f"shots must be 0 or more, got {options.shots}")
    for name, allowed in (("eval_mode", EVAL_MODES), ("search", SEARCHES)):
        if getattr(options, name) not in allowed:
            raise UsageError(f"unknown {name} {getattr(options, name)!r}; choose one of {', '.join(allowed)}")


def default_output_dir(root: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    return path


def _check_output_dir(path: str, resume: bool) -> None:
    """A new run never writes into an earlier run's folder; --resume needs one with a checkpoint."""
    from .train_state import CHECKPOINT

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output path {path} exists and is not a folder")
    # checkpoint.old: a checkpoint interrupted while being replaced (the trainer resumes from it)
    checkpoints = [os.path.join(path, name) for name in (CHECKPOINT, CHECKPOINT + ".old")]
    has_run = os.path.exists(os.path.join(path, METRICS_FILE)) or any(map(os.path.isdir, checkpoints))
    if resume and not os.path.exists(path):
        raise UsageError(f"--resume: {path} does not exist; give the --output-dir of an interrupted run")
    if resume and not any(map(os.path.isdir, checkpoints)):
        raise UsageError(f"--resume: {path} holds no {CHECKPOINT}/ to continue from; give the --output-dir of "
                         f"an interrupted run")
    if has_run and not resume:
        raise UsageError(f"{path} already holds a run; choose another --output-dir, or pass --resume to continue it")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folder is made later: its nearest existing ancestor must take it
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the run to {path}: {existing} is not writable by this user; choose another "
                         f"--output-dir")


def resolve_device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {requested!r} is not available here; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {requested!r} asked for, but there are {torch.cuda.device_count()} CUDA "
                         f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def num_processes() -> int:
    """Processes training together (torchrun and `accelerate launch` set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def optimizer_steps(num_examples: int, loop) -> int:
    """Optimizer steps of the whole run: each process takes every num_processes()-th batch of batch_size rows."""
    batches = -(-num_examples // loop.batch_size)
    per_process = -(-batches // num_processes())
    return loop.epochs * -(-per_process // loop.grad_accum)
