"""`unipeft test` (the task's metrics for a saved run on a split or on files) and `unipeft infer` (labels with
probabilities, values, or generations for texts)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from .errors import UsageError
from .saved_run import SavedRun, load_adapted, read_run

# Which model heads can be scored on a task's kind (a causal LM answers classification with label words).
HEADS_FOR = {"classification": ("classifier", "causal"), "regression": ("regressor",),
             "generation": ("seq2seq", "causal")}

@dataclasses.dataclass
class EvalOptions:
    """How `test` and `infer` run a saved model; None fields take the training run's value."""
    task: str | None = None
    data: str | None = None
    train_file: str | None = None  # icl: where the demonstrations come from
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    target_column: str | None = None
    direction: str | None = None
    split: str = "test"
    eval_mode: str | None = None
    shots: int | None = None
    search: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 64
    device: str | None = None


def _open(checkpoint: str | None, model: str | None, labels: list[str] | None, options: EvalOptions) -> SavedRun:
    if checkpoint is not None:
        return read_run(checkpoint, model, labels)
    if options.eval_mode != "icl" or not model:
        raise UsageError("pass --checkpoint DIR (a `unipeft train` run), or --eval-mode icl with --model and --task "
                         "to evaluate the base model in context")
    from .model import generation_head, resolve_model

    generation_head(resolve_model(model), need_decoder_only=True)  # an encoder-only model cannot answer in context
    return SavedRun(None, model, list(labels or []), {}, head="causal", task=options.task)


def _train_options(run: SavedRun, options: EvalOptions, need_data: bool = True):
    """The run's training options with this command's data and decoding choices over them."""
    from .plan import TrainOptions, resolve_device

    resolve_device(options.device)  # an unavailable device fails before anything loads
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    saved = {k: v for k, v in run.options.items() if k in known}
    given = {k: v for k, v in dataclasses.asdict(options).items() if k in known and v is not None}
    files = (options.data, options.train_file, options.validation_file, options.test_file)
    if any(files):  # evaluate other rows: none of the run's data options apply
        for key in ("data", "train_file", "validation_file", "test_file", "text_column", "pair_column",
                    "label_column", "target_column", "max_eval_samples"):
            saved.pop(key, None)
        saved["max_eval_samples"] = None
    merged = TrainOptions(**{**saved, **given, "task": options.task or run.task})
    if need_data and run.folder is not None and not run.options and not any(files):
        raise UsageError(f"{run.folder} has no metrics.json recording the data it was trained on; pass --data FILE")
    return merged


def _examples(run: SavedRun, train_options, options: EvalOptions):
    """(task, examples to evaluate, demonstration pool, description)."""
    from . import tasks
    from .run import load_run_data
    from .task_data import load_task_dataset

    if options.data and not options.train_file:  # every usable row of the file is evaluated
        task = tasks.task_for(train_options.task, options.data, train_options.direction)
        dataset = load_task_dataset(task, None, test_file=options.data, **_columns(train_options))
        examples, source = dataset.test, options.data
    else:
        task, dataset = load_run_data(train_options)
        split = options.split
        splits = {"test": dataset.test, "validation": dataset.validation, "train": dataset.train, **dataset.extra}
        if split not in splits:
            raise UsageError(f"unknown split {split!r}; {task.name} has {', '.join(splits)}")
        examples = splits[split]
        source = f"{dataset.source}, {split} split (seed {train_options.split_seed})"
    if task.kind == "classification" and run.labels and dataset.labels and dataset.labels != run.labels:
        unknown = sorted(set(dataset.labels) - set(run.labels))
        if unknown:
            raise UsageError(f"the data has labels the checkpoint's head does not know: {unknown}; it knows {run.labels}")
        index = {name: run.labels.index(name) for name in dataset.labels}
        examples = [dataclasses.replace(e, label=index[dataset.labels[e.label]]) for e in examples]
    return task, examples, dataset.train, source


def _columns(o) -> dict:
    return {k: getattr(o, k) for k in ("text_column", "pair_column", "label_column", "target_column", "direction")}


def _runner(run: SavedRun, task, train_options, demo_pool, tokenizer, options: EvalOptions):
    from .generation import pick_demos
    from .run import check_icl_task
    from .task_runner import TaskRunner

    icl = train_options.eval_mode == "icl"
    if icl and run.head != "causal":
        raise UsageError(f"--eval-mode icl needs a causal LM; {run.folder} holds a {run.head} model")
    if icl:
        check_icl_task(task)
    if run.head not in HEADS_FOR[task.kind]:
        raise UsageError(f"{task.name} is a {task.kind} task, but {run.folder} holds a {run.head} model; "
                         f"use a run trained on a {task.kind} task")
    if icl and train_options.shots and not demo_pool:  # --data alone is all rows to score: no demonstrations
        raise UsageError(f"--eval-mode icl with --shots {train_options.shots} needs training rows to draw "
                         f"demonstrations from: pass --train-file FILE with --test-file FILE instead of --data, "
                         f"or --shots 0")
    # balanced over the classes as in training; the base model alone (no checkpoint) has no labels of its own
    classes = len(run.labels or task.labels) or None
    demos = pick_demos(demo_pool, train_options.shots, train_options.seed, classes) if icl else None
    return TaskRunner(task, run.head, tokenizer, train_options.max_length, train_options.max_target_length,
                      run.labels, demos, train_options.search, train_options.num_beams,
                      train_options.max_new_tokens,  # each: this command's flag, else the run's own
                      options.batch_size)


def test(checkpoint: str | None, options: EvalOptions | None = None, model: str | None = None,
         labels: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    from .plan import resolve_device

    options = options or EvalOptions()
    run = _open(checkpoint, model, labels, options)
    train_options = _train_options(run, options)
    task, examples, demo_pool, source = _examples(run, train_options, options)
    peft_model, tokenizer = load_adapted(run, resolve_device(options.device))
    runner = _runner(run, task, train_options, demo_pool, tokenizer, options)
    metrics = runner.evaluate(peft_model, examples)
    result = {"checkpoint": run.folder, "task": task.name, "data": source, "num_examples": len(examples), **metrics}
    log(f"{run.folder or run.model} on {source}: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())} "
        f"over {len(examples)} examples")
    return result


def infer(checkpoint: str, texts: list[str], options: EvalOptions | None = None, model: str | None = None,
          labels: list[str] | None = None) -> list[dict]:
    """For each text: the predicted label and every label's probability, the value, or the generated text."""
    from . import tasks
    from .plan import resolve_device
    from .run import load_run_data

    if not texts:
        raise UsageError("no texts to run: give them as arguments, with --file, or on standard input")
    options = options or EvalOptions()
    run = _open(checkpoint, model, labels, options)
    train_options = _train_options(run, options, need_data=False)
    if train_options.eval_mode == "icl":  # the demonstrations come from the task's training split
        task, dataset = load_run_data(train_options)
        demo_pool = dataset.train
    else:
        task = tasks.task_for(train_options.task, train_options.data or train_options.train_file,
                              train_options.direction)
        demo_pool = []
    peft_model, tokenizer = load_adapted(run, resolve_device(options.device))
    return _runner(run, task, train_options, demo_pool, tokenizer, options).infer(peft_model, texts)
