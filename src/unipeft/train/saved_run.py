"""A run folder of `unipeft train` (adapter files, or the whole model for `--method full`, + metrics.json), loaded
back for `unipeft test` and `unipeft infer`.

metrics.json names the base model, the label names in head order and the data options, so a test on the
run's own split sees exactly the rows the run held out. A folder without metrics.json (an adapter from
elsewhere) needs `--model` (or the adapter config's base model) and `--labels`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import UsageError
from .run import METRICS_FILE

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"  # a whole saved model (`--method full`)


@dataclass
class SavedRun:
    folder: str
    model: str  # Hub name or local folder of the base model
    labels: list[str]  # names in the order of the head's outputs
    options: dict  # the training options recorded in metrics.json ({} without it)
    full: bool = False  # the folder holds the whole fine-tuned model, not an adapter


def read_run(folder: str, model: str | None = None, labels: list[str] | None = None) -> SavedRun:
    folder = os.path.expanduser(folder)
    full = not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))
    if full and not os.path.isfile(os.path.join(folder, MODEL_CONFIG)):
        raise UsageError(f"--checkpoint {folder} is not an adapter folder or a saved model (no {ADAPTER_CONFIG} or "
                         f"{MODEL_CONFIG}); point it at the --output-dir of a `unipeft train` run")
    metrics = {}
    if os.path.isfile(os.path.join(folder, METRICS_FILE)):
        try:
            with open(os.path.join(folder, METRICS_FILE), encoding="utf-8") as fh:
                metrics = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read {os.path.join(folder, METRICS_FILE)}: {exc}") from None
    if full:
        model = folder
    else:
        with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as fh:
            model = model or metrics.get("model") or json.load(fh).get("base_model_name_or_path")
    labels = labels or metrics.get("labels")
    if not model:
        raise UsageError(f"{folder} does not name its base model; pass --model NAME_OR_FOLDER")
    if not labels:
        raise UsageError(f"{folder} has no {METRICS_FILE} naming its labels; pass --labels in the head's order, e.g. --labels neg,pos")
    return SavedRun(folder, model, list(labels), metrics.get("options") or {}, full)


def load_adapted(run: SavedRun, device):
    """(the base model with the run's adapter and head, tokenizer); a mismatched adapter is a UsageError."""
    from ..config import ConfigError
    from ..engine.checkpoint import CheckpointError
    from ..engine.inject import CheckpointMismatchError
    from ..peft_model import PeftModel
    from .model import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(run.model), run.labels)
    if run.full:
        return model.to(device).eval(), tokenizer
    try:
        peft_model = PeftModel.from_pretrained(model, run.folder)
    except (CheckpointMismatchError, CheckpointError, ConfigError) as exc:
        raise UsageError(f"cannot load the adapter in {run.folder} onto {run.model} with {len(run.labels)} labels: {exc}") from None
    return peft_model.to(device).eval(), tokenizer
