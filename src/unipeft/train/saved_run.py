"""A run folder of `unipeft train` (adapter files, or the whole model for `--method full`, + metrics.json), loaded
back for `unipeft test` and `unipeft infer`.

metrics.json names the task, the base model, the model head, the label names in head order and the data
options, so a test on the run's own split sees exactly the rows the run held out. A folder without
metrics.json (an adapter from elsewhere) needs `--model` (or the adapter config's base model), and `--labels`
when its head is a classifier; its head follows the adapter config's task_type.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError
from .methods import read_json_object
from .plan import METRICS_FILE

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"  # a whole saved model (`--method full`)


@dataclass
class SavedRun:
    folder: str | None  # None: the base model alone (in-context evaluation without an adapter)
    model: str  # Hub name or local folder of the base model
    labels: list[str]  # names in the order of the head's outputs ([] for regression and generation)
    options: dict  # the training options recorded in metrics.json ({} without it)
    full: bool = False  # the folder holds the whole fine-tuned model, not an adapter
    task: str | None = None  # the task it was trained on (None: a classification file, or unknown)
    head: str = "classifier"


def _head_of_task_type(task_type) -> str:
    """An adapter from elsewhere: its task type tells the head (SEQ_CLS: a classifier, not a regressor)."""
    from .model import TASK_TYPES

    heads = {kind: head for head, kind in TASK_TYPES.items() if head != "regressor"}
    return heads.get(str(task_type), "classifier")


def read_run(folder: str, model: str | None = None, labels: list[str] | None = None) -> SavedRun:
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"--checkpoint {folder} does not exist (or is not a folder); point it at the --output-dir "
                         f"of a `unipeft train` run")
    full = not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))
    if full and not os.path.isfile(os.path.join(folder, MODEL_CONFIG)):
        raise UsageError(f"--checkpoint {folder} is not an adapter folder or a saved model (no {ADAPTER_CONFIG} or "
                         f"{MODEL_CONFIG}); point it at the --output-dir of a `unipeft train` run")
    metrics_path = os.path.join(folder, METRICS_FILE)
    metrics = read_json_object(metrics_path, "run metrics") if os.path.isfile(metrics_path) else {}
    adapter = {} if full else read_json_object(os.path.join(folder, ADAPTER_CONFIG), "adapter config")
    model = folder if full else model or metrics.get("model") or adapter.get("base_model_name_or_path")
    head = metrics.get("head") or _head_of_task_type(adapter.get("task_type"))
    labels = labels or metrics.get("labels") or []
    if not model:
        raise UsageError(f"{folder} does not name its base model; pass --model NAME_OR_FOLDER")
    if head == "classifier" and not labels:
        raise UsageError(f"{folder} has no {METRICS_FILE} naming its labels; pass --labels in the head's order, e.g. --labels neg,pos")
    return SavedRun(folder, model, list(labels), metrics.get("options") or {}, full, metrics.get("task"), head)


def load_adapted(run: SavedRun, device):
    """(the base model with the run's adapter and head, tokenizer); a mismatched adapter is a UsageError."""
    from ..config import ConfigError
    from ..engine.checkpoint import CheckpointError
    from ..engine.inject import CheckpointMismatchError
    from ..peft_model import PeftModel
    from .model import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(run.model), run.labels, run.head)
    if run.full or run.folder is None:
        return model.to(device).eval(), tokenizer
    try:
        peft_model = PeftModel.from_pretrained(model, run.folder)
    except (CheckpointMismatchError, CheckpointError, ConfigError) as exc:
        what = f"{len(run.labels)} labels" if run.head == "classifier" else f"a {run.head} head"
        raise UsageError(f"cannot load the adapter in {run.folder} onto {run.model} with {what}: {exc}") from None
    return peft_model.to(device).eval(), tokenizer
