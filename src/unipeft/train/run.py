"""One training run, end to end: task data -> model + adapter -> Accelerate loop -> adapter files and reports.

    runs/<timestamp>/adapter_config.json        the adapter, in Hugging Face PEFT's layout (the best evaluation's)
    runs/<timestamp>/adapter_model.safetensors  (with the trained classification head for classification tasks)
    runs/<timestamp>/metrics.json               options, split sizes, validation and test metrics, timing
    runs/<timestamp>/log.jsonl                  training loss, learning rate and throughput; each evaluation
    runs/<timestamp>/curves.png, summary.md     loss and metric vs step; a short report
    runs/<timestamp>/checkpoint/                the trainable tensors, optimiser, schedule and RNG state (--resume)

The options are checked once into a frozen plan (plan.py) before anything loads; the run then goes one way:
data -> head and adapter config -> model and its checks -> fit -> final evaluations -> files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from .errors import UsageError
from .methods import method_config
from .plan import METRICS_FILE, RunPlan, TrainOptions, is_main_process, optimizer_steps, plan_run


def run(options: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and save; returns the metrics also written to metrics.json. Every check that can fail
    runs before the first file is written."""
    from .model import TASK_TYPES, resolve_model
    from .model_checks import check_model_fits
    from .task_runner import TaskRunner
    from .trainer import fit

    started = time.perf_counter()
    plan = plan_run(options)
    options = plan.options
    if not is_main_process():  # the other processes train and evaluate alike but write and print nothing
        log = _silent
    task, dataset = _load_data(options, log)
    model_name = resolve_model(options.model)
    head = choose_head(task, options.eval_mode, model_name)
    config = method_config(options, task_type=TASK_TYPES[head],
                           total_steps=optimizer_steps(len(dataset.train), plan.loop))
    model, tokenizer = _load_model(plan, model_name, dataset.labels, head)
    check_model_fits(options, task, head, config, model, tokenizer)
    log(f"model: {model_name} ({type(model).__name__}) on {plan.device}")
    peft_model, trainable, total = _attach(model, config, plan.method, log)

    runner = TaskRunner(task, head, tokenizer, options.max_length, options.max_target_length, dataset.labels,
                        _demos(options, dataset), options.search, options.num_beams, options.max_new_tokens,
                        options.batch_size)
    main_metric = task.metrics[0]
    result = fit(peft_model, dataset.train, runner.collate(), lambda: runner.evaluate(peft_model, dataset.validation),
                 main_metric, _greater_is_better(main_metric), plan.loop, plan.output_dir, resume=options.resume,
                 log=log, fixed=plan.fixed_on_resume)
    evaluations = _final_evaluations(plan, runner, peft_model, dataset, result, log)
    _save_trained(peft_model, tokenizer, config is None, plan.output_dir)
    metrics = _metrics(plan, task, dataset, head, model_name, result, evaluations, trainable, total)
    metrics["total_seconds"] = time.perf_counter() - started
    if task.kind == "classification":
        log(f"majority-class baseline (always {metrics['majority_label']!r}): test accuracy "
            f"{metrics['majority_baseline']:.4f}")
    if is_main_process():
        _write_reports(metrics, result.history, plan.output_dir)
    log(f"saved {'model' if config is None else 'adapter'}, {METRICS_FILE}, summary.md and curves.png to "
        f"{plan.output_dir} ({metrics['total_seconds']:.0f} s in all, {result.train_seconds:.0f} s training)")
    return metrics


def _load_data(options: TrainOptions, log: Callable[[str], None]):
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
    return task, dataset


def _load_model(plan: RunPlan, model_name: str, labels: list[str], head: str):
    """(model, tokenizer) on the plan's device and engine, the new head and the adapter seeded."""
    import torch

    from .engines import partitioned_loading
    from .model import load_model

    device, engine = plan.device, plan.engine
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Accelerate places the run on the current CUDA device
    if device.type == "cpu":  # DeepSpeed, when installed, would otherwise probe for GPUs and warn on each run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.manual_seed(plan.options.seed)  # the new head and the adapter start from seeded random values
    if engine.zero_stage == 3:  # the base loads partitioned: every process takes part, in a process group
        from accelerate.state import PartialState

        PartialState(cpu=device.type == "cpu")
    with partitioned_loading(engine):  # FSDP: only the first process reads the weights; it sends the others theirs
        return load_model(model_name, labels, head, on_meta=engine.kind == "fsdp" and not is_main_process())


def _attach(model, config, method: str, log: Callable[[str], None]):
    """(the model to train, trainable count, total count): the adapter attached, or (config None, full
    fine-tuning) the model itself with every weight trainable."""
    from ..config import ConfigError
    from ..engine.sharding import numel
    from ..engine.targeting import TargetError
    from ..peft_model import get_peft_model

    if config is None:  # full fine-tuning, the baseline: the model itself trains and is saved whole
        peft_model = model.requires_grad_(True)
        trainable = total = sum(numel(p) for p in model.parameters())
        log(f"method: {method} (every weight trains; the whole model and its tokenizer are saved)")
    else:
        try:
            peft_model = get_peft_model(model, config)
        except (ConfigError, TargetError) as exc:
            raise UsageError(f"cannot attach the adapter: {exc}") from None
        trainable, total = peft_model.get_nb_trainable_parameters()
        attached = peft_model.active_peft_config  # the family's default targets and the task head filled in
        log(f"method: {method} ({attached.describe()}; trained and saved head: "
            f"{', '.join(attached.modules_to_save or []) or 'none'})")
    log(f"trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)")
    return peft_model, trainable, total


def _demos(options: TrainOptions, dataset):
    """In-context evaluation's examples, drawn from the train split; None otherwise."""
    from .generation import pick_demos

    if options.eval_mode != "icl":
        return None
    return pick_demos(dataset.train, options.shots, options.seed, len(dataset.labels) or None)


def _greater_is_better(metric: str) -> bool:
    from .metrics import GREATER_IS_BETTER

    return GREATER_IS_BETTER[metric]


def _final_evaluations(plan: RunPlan, runner, model, dataset, result, log: Callable[[str], None]) -> dict:
    """{"validation": the best evaluation's metrics (the last when there was none), "test": ..., and
    "test_<name>" for each extra split}."""
    validation = result.best_metrics or runner.evaluate(model, dataset.validation)
    with _autocast(plan.device, plan.options.precision):  # as the validation evaluations inside fit ran
        test = runner.evaluate(model, dataset.test)
        extra = {name: runner.evaluate(model, examples) for name, examples in dataset.extra.items()}
    best = "best, step " + str(result.best_step) if result.best_metrics else "last"
    log(f"validation ({best}): {_format(validation)}")
    log(f"test: {_format(test)}")
    for name, values in extra.items():
        log(f"{name}: {_format(values)}")
    return {"validation": validation, "test": test, **{f"test_{name}": values for name, values in extra.items()}}


def _save_trained(model, tokenizer, whole_model: bool, output_dir: str) -> None:
    from ..engine.sharding import whole_parameters

    with whole_parameters(model, trainable_only=True):  # whole tensors under ZeRO-3 and FSDP; every process takes part
        if is_main_process():
            model.save_pretrained(output_dir)
            if whole_model:
                tokenizer.save_pretrained(output_dir)


def _metrics(plan: RunPlan, task, dataset, head: str, model_name: str, result, evaluations: dict,
             trainable: int, total: int) -> dict:
    """metrics.json's content (total_seconds added by the caller)."""
    from .data import majority_label

    metrics = {
        "task": task.name, "kind": task.kind, "head": head, "eval_mode": plan.options.eval_mode,
        "method": plan.method, "model": model_name, "data": dataset.source, "labels": dataset.labels,
        "num_train": len(dataset.train), "num_validation": len(dataset.validation), "num_test": len(dataset.test),
        "main_metric": task.metrics[0],
        **evaluations,
        "epochs": _epoch_records(result.history),
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "lr": plan.loop.lr,
        "steps": result.steps,
        "device": str(plan.device),
        "train_seconds": result.train_seconds,
        "examples_per_second": result.examples_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "options": dataclasses.asdict(plan.options) | {"output_dir": plan.output_dir},
    }
    if task.kind == "classification":
        majority = majority_label(dataset.train)
        metrics |= {"validation_accuracy": evaluations["validation"].get("accuracy"),
                    "test_accuracy": evaluations["test"].get("accuracy"),
                    "majority_label": dataset.labels[majority],
                    "majority_baseline": sum(e.label == majority for e in dataset.test) / len(dataset.test)}
    return metrics


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


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


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
    from ..atomic_files import atomic_write_text
    from .report import write_curves, write_summary

    atomic_write_text(os.path.join(output_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    write_summary(metrics, os.path.join(output_dir, "summary.md"))
    write_curves(history, os.path.join(output_dir, "curves.png"), metrics["main_metric"])
