"""One training run, end to end: task data -> model + adapter -> Accelerate loop -> adapter files and reports.

    runs/<timestamp>/adapter_config.json        the adapter, in Hugging Face PEFT's layout (the best evaluation's)
    runs/<timestamp>/adapter_model.safetensors  (with the trained classification head for classification tasks)
    runs/<timestamp>/metrics.json               options, split sizes, validation and test metrics, timing
    runs/<timestamp>/log.jsonl                  training loss, learning rate and throughput; each evaluation
    runs/<timestamp>/curves.png, summary.md     loss and metric vs step; a short report
    runs/<timestamp>/checkpoint/                the trainable tensors, optimiser, schedule and RNG state (--resume)
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from .errors import UsageError
from .methods import check_method, default_lr, method_config

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
    total_steps: int | None = None  # not a flag: set by run() to the optimizer steps (AdaLoRA's schedule length)
    task_type: str = "SEQ_CLS"  # not a flag: set by run() from the model head


def default_output_dir(root: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    return path


def _check_options(options: TrainOptions) -> None:
    """Every option a run reads, before anything loads (the loop's own in trainer.check_options)."""
    from .generation import SEARCHES
    from .trainer import check_options

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
    device = resolve_device(options.device)  # an unknown or missing device fails before anything loads
    check_options(loop_options(options, device))


def loop_options(options: TrainOptions, device):
    """The training loop's options of a run (the method's default learning rate unless --lr is given)."""
    from .trainer import LoopOptions

    lr = options.lr if options.lr is not None else default_lr(options.method)
    return LoopOptions(epochs=options.epochs, batch_size=options.batch_size, lr=lr, weight_decay=options.weight_decay,
                       warmup_ratio=options.warmup_ratio, schedule=options.schedule, grad_accum=options.grad_accum,
                       eval_every=options.eval_every, early_stopping=options.early_stopping,
                       mixed_precision=options.precision, seed=options.seed, progress=options.progress,
                       device=device.type, engine=options.engine)


# What --resume may change: where and how it runs and reports, how it evaluates. Everything else decides the
# data, the model or the training, and must be what the checkpoint was written with.
RESUME_MAY_CHANGE = ("output_dir", "resume", "progress", "device", "precision", "eval_every", "early_stopping",
                     "search", "num_beams", "max_new_tokens", "total_steps", "task_type")


def _fixed_on_resume(options: TrainOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in RESUME_MAY_CHANGE}


def _check_output_dir(path: str, resume: bool) -> None:
    """A new run never writes into an earlier run's folder; --resume needs one with a checkpoint."""
    from .trainer import CHECKPOINT

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


def _check_room_for_virtual_tokens(options: TrainOptions, model) -> None:
    """Texts are cut at max_length tokens, and a prompt method adds num_virtual_tokens positions in front of
    them: refuse before training when both together overflow a learned position table (MiniLM: 512), which
    would otherwise fail at the first long batch. Models with relative or rotary positions have no such limit."""
    from ..compat import position_limit

    limit = position_limit(model)
    room = None if limit is None else limit - options.num_virtual_tokens
    if room is not None and options.max_length > room:
        if room < 1:
            raise UsageError(f"{options.num_virtual_tokens} virtual tokens leave no room for text in the model's "
                             f"{limit} positions; choose fewer --num-virtual-tokens")
        raise UsageError(f"max_length {options.max_length} plus {options.num_virtual_tokens} virtual tokens is more "
                         f"than the model's {limit} positions; use --max-length {room} or less (or fewer "
                         f"--num-virtual-tokens)")


def _check_sentence_encoder(options: TrainOptions, method_config, tokenizer) -> None:
    """A separate sentence encoder reads the base model's input_ids: it must know every id of the tokenizer and
    (with pg's encoder prompt in front) have positions for the longest text. Checked from its config alone."""
    from transformers import AutoConfig

    name = options.sentence_encoder
    extra = options.num_virtual_tokens if getattr(method_config, "learn_encoder_prompt", False) else 0
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
    if isinstance(positions, int) and options.max_length + extra > positions:
        raise UsageError(f"sentence encoder {name!r} has {positions} positions, fewer than max_length "
                         f"{options.max_length}" + (f" plus {extra} encoder-prompt tokens" if extra else ""))


def _attach_adapter(model, config):
    from ..config import ConfigError
    from ..engine.targeting import TargetError
    from ..peft_model import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ConfigError, TargetError) as exc:
        raise UsageError(f"cannot attach the adapter: {exc}") from None


def load_run_data(options: TrainOptions):
    """(task, dataset): a registered task's data (its hub dataset, or local files), the embedded tweets corpus,
    or a local classification file without --task."""
    from . import tasks
    from .task_data import load_task_dataset

    task = tasks.task_for(options.task, options.data or options.train_file, options.direction)
    dataset = load_task_dataset(
        task, options.data, train_file=options.train_file, validation_file=options.validation_file,
        test_file=options.test_file, text_column=options.text_column, pair_column=options.pair_column,
        label_column=options.label_column, target_column=options.target_column, direction=options.direction,
        split_seed=options.split_seed, max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples)
    return task, dataset


def check_icl_task(task) -> None:
    """In-context evaluation scores label words (classification) or generates (generation)."""
    if task.kind == "regression":
        raise UsageError(f"--eval-mode icl scores label words; {task.name} is a regression task")
    if task.kind == "classification" and not task.label_words:
        what = "a file without --task" if task.name == "file" else task.name
        raise UsageError(f"--eval-mode icl scores label words, and {what} has none; use a --task that has "
                         f"them (e.g. sst2, with its columns in --data)")


def choose_head(task, eval_mode: str, model_name: str) -> str:
    """The output layer a run needs: generation tasks and in-context evaluation need a language model."""
    from .model import generation_head

    if eval_mode == "icl":
        check_icl_task(task)
        return generation_head(model_name, need_decoder_only=True)
    if task.kind == "generation":
        return generation_head(model_name)
    return "regressor" if task.kind == "regression" else "classifier"


def num_processes() -> int:
    """Processes training together (torchrun and `accelerate launch` set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def optimizer_steps(num_examples: int, options: TrainOptions) -> int:
    """Optimizer steps of the whole run: each process takes every num_processes()-th batch of batch_size rows."""
    batches = -(-num_examples // options.batch_size)
    per_process = -(-batches // num_processes())
    return options.epochs * -(-per_process // options.grad_accum)


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def run(options: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and save; returns the metrics also written to metrics.json. Every check that can fail
    runs before the first file is written."""
    started = time.perf_counter()
    method = check_method(options.method)
    _check_options(options)
    if num_processes() > 1 and not options.output_dir:
        raise UsageError("several processes must agree on the run folder: pass --output-dir")
    if not is_main_process():  # the other processes train and evaluate alike but write and print nothing
        log = _silent
    output_dir = options.output_dir or default_output_dir()
    _check_output_dir(output_dir, options.resume)
    # fails on a bad knob before anything slow happens (the run takes at least one step per epoch)
    method_config(dataclasses.replace(options, total_steps=options.epochs))

    task, dataset = load_run_data(options)
    require_packages(task.metrics)
    for name in ("train", "validation"):
        if not getattr(dataset, name):
            raise UsageError(f"{dataset.source}: no usable rows left for the {name} split")
    log(f"task: {task.name} ({task.kind}; metrics: {', '.join(task.metrics)}); data: {dataset.source}")
    for note in dataset.notes:
        log(f"  note: {note}")
    if dataset.labels:
        log(f"  labels: {', '.join(dataset.labels)}")
    log(f"  split (seed {options.split_seed}): {len(dataset.train)} train, {len(dataset.validation)} validation, "
        f"{len(dataset.test)} test")

    import torch

    from ..engine.sharding import numel, whole_parameters
    from .data import majority_label
    from .engines import partitioned_loading, resolve_engine
    from .generation import pick_demos
    from .metrics import GREATER_IS_BETTER
    from .model import TASK_TYPES, load_model, resolve_model
    from .task_runner import TaskRunner
    from .trainer import fit

    device = resolve_device(options.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Accelerate places the run on the current CUDA device
    if device.type == "cpu":  # DeepSpeed, when installed, would otherwise probe for GPUs and warn on each run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model_name = resolve_model(options.model)
    head = choose_head(task, options.eval_mode, model_name)
    torch.manual_seed(options.seed)  # the new head and the adapter start from seeded random values
    engine = resolve_engine(options.engine)
    if engine.zero_stage == 3:  # the base loads partitioned: every process takes part, in a process group
        from accelerate.state import PartialState

        PartialState(cpu=device.type == "cpu")
    with partitioned_loading(engine):  # FSDP: only the first process reads the weights; it sends the others theirs
        model, tokenizer = load_model(model_name, dataset.labels, head,
                                      on_meta=engine.kind == "fsdp" and not is_main_process())
    _check_lengths(options, task, head, tokenizer, model)
    options = dataclasses.replace(options, total_steps=optimizer_steps(len(dataset.train), options),
                                  task_type=TASK_TYPES[head])
    config = method_config(options)
    if config is not None and config.is_prompt_learning:
        _check_room_for_virtual_tokens(options, model)
    if options.sentence_encoder and getattr(config, "sentence_encoder", None):
        _check_sentence_encoder(options, config, tokenizer)
    log(f"model: {model_name} ({type(model).__name__}) on {device}")
    if config is None:  # full fine-tuning, the baseline: the model itself trains and is saved whole
        peft_model = model.requires_grad_(True)
        trainable = total = sum(numel(p) for p in model.parameters())
        log(f"method: {method} (every weight trains; the whole model and its tokenizer are saved)")
    else:
        peft_model = _attach_adapter(model, config)
        trainable, total = peft_model.get_nb_trainable_parameters()
        attached = peft_model.active_peft_config  # the family's default targets and the task head filled in
        log(f"method: {method} ({attached.describe()}; trained and saved head: "
            f"{', '.join(attached.modules_to_save or []) or 'none'})")
    log(f"trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)")

    demos = pick_demos(dataset.train, options.shots, options.seed, len(dataset.labels) or None) \
        if options.eval_mode == "icl" else None
    runner = TaskRunner(task, head, tokenizer, options.max_length, options.max_target_length, dataset.labels, demos,
                        options.search, options.num_beams, options.max_new_tokens, options.batch_size)
    main_metric = task.metrics[0]
    loop = loop_options(options, device)
    result = fit(peft_model, dataset.train, runner.collate(), lambda: runner.evaluate(peft_model, dataset.validation),
                 main_metric, GREATER_IS_BETTER[main_metric], loop, output_dir, resume=options.resume, log=log,
                 fixed=_fixed_on_resume(options))
    validation = result.best_metrics or runner.evaluate(peft_model, dataset.validation)
    with _autocast(device, options.precision):  # as the validation evaluations inside fit ran
        test = runner.evaluate(peft_model, dataset.test)
        extra = {name: runner.evaluate(peft_model, examples) for name, examples in dataset.extra.items()}
    log(f"validation ({'best, step ' + str(result.best_step) if result.best_metrics else 'last'}): {_format(validation)}")
    log(f"test: {_format(test)}")
    for name, values in extra.items():
        log(f"{name}: {_format(values)}")

    with whole_parameters(peft_model, trainable_only=True):  # whole tensors under ZeRO-3 and FSDP; every process takes part
        if is_main_process():
            peft_model.save_pretrained(output_dir)
            if config is None:
                tokenizer.save_pretrained(output_dir)
    metrics = {
        "task": task.name,
        "kind": task.kind,
        "head": head,
        "eval_mode": options.eval_mode,
        "method": method,
        "model": model_name,
        "data": dataset.source,
        "labels": dataset.labels,
        "num_train": len(dataset.train),
        "num_validation": len(dataset.validation),
        "num_test": len(dataset.test),
        "main_metric": main_metric,
        "validation": validation,
        "test": test,
        **{f"test_{name}": values for name, values in extra.items()},
        "epochs": _epoch_records(result.history),
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "lr": loop.lr,
        "steps": result.steps,
        "device": str(device),
        "train_seconds": result.train_seconds,
        "examples_per_second": result.examples_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "total_seconds": time.perf_counter() - started,
        "options": dataclasses.asdict(options) | {"output_dir": output_dir},
    }
    if task.kind == "classification":
        majority = majority_label(dataset.train)
        metrics |= {"validation_accuracy": validation.get("accuracy"), "test_accuracy": test.get("accuracy"),
                    "majority_label": dataset.labels[majority],
                    "majority_baseline": sum(e.label == majority for e in dataset.test) / len(dataset.test)}
        log(f"majority-class baseline (always {dataset.labels[majority]!r}): test accuracy "
            f"{metrics['majority_baseline']:.4f}")
    if is_main_process():
        _write_reports(metrics, result.history, output_dir)
    log(f"saved {'model' if config is None else 'adapter'}, {METRICS_FILE}, summary.md and curves.png to {output_dir} "
        f"({metrics['total_seconds']:.0f} s in all, {result.train_seconds:.0f} s training)")
    return metrics


def _silent(_: str) -> None:
    pass


def _autocast(device, precision: str):
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "no")


def require_packages(metric_names) -> None:
    """The packages a run needs beyond torch and transformers, checked before it trains."""
    from .metrics import require_packages as require_metric_packages
    from .report import new_figure

    require_metric_packages(metric_names)
    new_figure()  # curves.png


ANSWER_ROOM = 8  # tokens a label word may take after an evaluation prompt


def _check_lengths(options: TrainOptions, task, head: str, tokenizer, model) -> None:
    """Every sequence the run feeds the model must fit its position table, or the run would fail mid-way:
    the inputs; for a causal LM also prompt + answer in training, and the (in-context) prompt + what it
    generates or the label word it scores in evaluation."""
    from .model import check_max_length

    check_max_length(options.max_length, tokenizer, model, "--max-length")
    if head != "causal":
        return
    check_max_length(options.max_length + options.max_target_length, tokenizer, model,
                     "--max-length plus --max-target-length (a training prompt and its answer)")
    shots = options.shots if options.eval_mode == "icl" else 0
    answer = options.max_new_tokens or (task.max_new_tokens if task.kind == "generation" else ANSWER_ROOM)
    check_max_length(options.max_length * (1 + shots) + answer, tokenizer, model,
                     f"--max-length × (1 + {shots} shots) plus {answer} answer tokens (an evaluation prompt)")


def _epoch_records(history: list[dict]) -> list[dict]:
    """Per whole epoch: the mean training loss (the log's records weighted by the steps they cover) and the
    evaluation made at the epoch's end, when there was one."""
    import math

    epochs: dict[int, dict] = {}
    last_step = 0
    for record in history:
        epoch = max(1, math.ceil(record["epoch"] - 1e-9))
        entry = epochs.setdefault(epoch, {"epoch": epoch, "loss_sum": 0.0, "steps": 0})
        if "loss" in record:
            entry["loss_sum"] += record["loss"] * (record["step"] - last_step)
            entry["steps"] += record["step"] - last_step
            last_step = record["step"]
        elif abs(record["epoch"] - epoch) < 1e-9:  # an evaluation at the epoch's end
            entry.update({f"validation_{k}": v for k, v in record["eval"].items()})
    return [{"epoch": e["epoch"], "train_loss": e.pop("loss_sum") / max(1, e.pop("steps")), **e}
            for e in (epochs[k] for k in sorted(epochs))]


def _write_reports(metrics: dict, history: list[dict], output_dir: str) -> None:
    from ..engine.checkpoint import atomic_write_text
    from .report import write_curves, write_summary

    atomic_write_text(os.path.join(output_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    write_summary(metrics, os.path.join(output_dir, "summary.md"))
    write_curves(history, os.path.join(output_dir, "curves.png"), metrics["main_metric"])
