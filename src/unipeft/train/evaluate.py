"""`unipeft test` (accuracy of a saved run on a split or a file) and `unipeft infer` (labels with probabilities)."""
from __future__ import annotations

import os
from typing import Callable

from . import data as data_mod
from .errors import UsageError
from .saved_run import SavedRun, load_adapted, read_run

DEFAULT_MAX_LENGTH = 64  # TrainOptions' default, for folders without metrics.json


def examples_to_test(run: SavedRun, split: str, data: str | None, text_column: str | None,
                     label_column: str | None) -> tuple[list[data_mod.Example], str]:
    """The run's own held-out split (same file, columns and split seed), or every usable row of `data`."""
    if data is None:
        if not run.options:
            raise UsageError(f"{run.folder} has no metrics.json recording the data it was trained on; pass --data FILE")
        o = run.options
        dataset = data_mod.load_dataset(o.get("data"), o.get("text_column"), o.get("label_column"), o.get("split_seed", 0),
                                        o.get("max_train_samples"), o.get("max_eval_samples"))
        if dataset.labels != run.labels:
            raise UsageError(f"the run's data now has labels {dataset.labels}, but its head was trained on {run.labels}; "
                             f"pass --data with the labels the head knows")
        return getattr(dataset, split), f"{dataset.source}, {split} split (seed {o.get('split_seed', 0)})"
    path = os.path.expanduser(data)
    if not os.path.isfile(path):
        raise UsageError(f"--data {data} does not exist")
    rows, columns = data_mod.read_table(path)
    pairs, _ = data_mod.to_examples(rows, columns, text_column or data_mod.FILE_TEXT_COLUMN,
                                    label_column or data_mod.FILE_LABEL_COLUMN, path, [])
    unknown = sorted({label for _, label in pairs} - set(run.labels))
    if unknown:
        raise UsageError(f"{data} has labels the checkpoint's head does not know: {unknown}; it knows {run.labels}")
    return [data_mod.Example(text, run.labels.index(label)) for text, label in pairs], path


def test(checkpoint: str, split: str = "test", data: str | None = None, text_column: str | None = None,
         label_column: str | None = None, batch_size: int = 64, device: str | None = None, model: str | None = None,
         labels: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    from .loop import accuracy, make_loader, predict
    from .run import resolve_device

    run = read_run(checkpoint, model, labels)
    examples, source = examples_to_test(run, split, data, text_column, label_column)
    device = resolve_device(device)
    peft_model, tokenizer = load_adapted(run, device)
    loader = make_loader(examples, tokenizer, batch_size, run.options.get("max_length", DEFAULT_MAX_LENGTH))
    result = {"checkpoint": run.folder, "data": source, "num_examples": len(examples),
              "accuracy": accuracy(predict(peft_model, loader, device), examples)}
    log(f"{run.folder} on {source}: accuracy {result['accuracy']:.4f} over {len(examples)} examples")
    return result


def infer(checkpoint: str, texts: list[str], batch_size: int = 64, device: str | None = None, model: str | None = None,
          labels: list[str] | None = None) -> list[dict]:
    """For each text: the predicted label and the probability of every label."""
    import torch

    from .loop import to_device
    from .run import resolve_device

    if not texts:
        raise UsageError("no texts to classify: give them as arguments, with --file, or on standard input")
    run = read_run(checkpoint, model, labels)
    device = resolve_device(device)
    peft_model, tokenizer = load_adapted(run, device)
    max_length = run.options.get("max_length", DEFAULT_MAX_LENGTH)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            probabilities = peft_model(**to_device(dict(batch), device)).logits.float().softmax(dim=-1).cpu()
            for text, p in zip(chunk, probabilities.tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                out.append({"text": text, "label": run.labels[best], "probabilities": dict(zip(run.labels, p))})
    return out
