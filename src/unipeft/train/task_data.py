"""Reading a task's data: its Hub dataset through `datasets.load_dataset`, or local files, into the
train/validation/test (and extra) splits of a `Dataset`, with the task's labels checked.

Local files (one --data file split 80/10/10, or --train-file/--validation-file/--test-file) replace the Hub.
"""
from __future__ import annotations

import dataclasses
import os
import random

from . import data as data_mod
from .data import Dataset, Example
from .errors import UsageError
from .tasks import DEFAULT_TASK, FILE_TASK, FLAGS, Task, get_task

MAX_CARVED_VALIDATION = 1000  # validation rows carved from a train split that has no validation partner
DIALOGUE_HISTORY = 3  # turns of context before the reply


Record = tuple  # (text, text_pair or None, raw label or target string) before labels become ids


def _clean(value) -> str:
    return "" if value is None else str(value).strip()


def _label(value) -> str:
    return "" if value is None else data_mod._label_name(value)  # 1.0 -> "1", as data.py reads labels


def _roles(task: Task) -> list[tuple[str, str]]:
    """(role, column) pairs the data must have, role being a key of FLAGS."""
    roles = [("text", task.text_column)]
    if task.pair_column:
        roles.append(("pair", task.pair_column))
    roles.append(("target", task.target_column) if task.kind == "generation" else ("label", task.label_column))
    return roles


def _records(rows: list[dict], found: list[str], task: Task, where: str, notes: list[str],
             dedup: bool = True) -> list[Record]:
    """One record per usable row: rows missing a value are dropped, and (with dedup) repeated inputs."""
    roles = _roles(task)
    for role, column in roles:
        if column not in found:
            raise UsageError(f"{where} has no {role} column {column!r}; columns found: {found} "
                             f"(choose with {FLAGS[role]})")
    columns = dict(roles)
    records, seen, empty, repeated = [], set(), 0, 0
    for row in rows:
        text = _clean(row.get(columns["text"]))
        pair = _clean(row.get(columns["pair"])) if "pair" in columns else None
        value = _clean(row.get(columns["target"])) if "target" in columns else _label(row.get(columns["label"]))
        if not text or pair == "" or not value:
            empty += 1
        elif dedup and (text, pair) in seen:  # a repeated input could land in train and test at once
            repeated += 1
        else:
            seen.add((text, pair))
            records.append((text, pair, value))
    if empty:
        notes.append(f"{where}: dropped {empty} row(s) with an empty {' or '.join(r for r, _ in roles)}")
    if repeated:
        notes.append(f"{where}: dropped {repeated} repeated input(s) (first occurrence kept)")
    return records


def _file_records(path, task: Task, notes: list[str]) -> list[Record]:
    rows, found = data_mod.read_table(os.fspath(path), notes)
    return _records(rows, found, task, os.fspath(path), notes)


def _label_ids(task: Task, parts: dict[str, list[Record]]) -> tuple[dict[str, int], list[str]]:
    """Raw label -> class id, and the label names. Fixed labels accept their names or their ids."""
    if task.labels:
        ids = {name: i for i, name in enumerate(task.labels)} | {str(i): i for i in range(len(task.labels))}
        return ids, list(task.labels)
    names = data_mod._ordered_labels({value for records in parts.values() for _, _, value in records})
    if len(names) < 2 and parts["train"]:  # a test file alone may hold one class
        raise UsageError(f"column {task.label_column!r} must hold at least 2 distinct labels, found {names}")
    return {name: i for i, name in enumerate(names)}, names


def _check_labels(task: Task, records: list[Record], ids: dict[str, int], where: str) -> None:
    """Every label of every split at once, so the error lists them all."""
    if task.kind == "regression":
        bad = sorted({value for _, _, value in records if not _is_number(value)})
        if bad:
            raise UsageError(f"{where}: {task.name} needs numeric labels in {task.label_column!r}; "
                             f"not numbers: {bad[:10]}")
    elif task.kind == "classification":
        unknown = sorted({value for _, _, value in records if value not in ids})
        if unknown:
            known = ", ".join(f"{name} ({i})" for name, i in ids.items() if not name.isdigit())
            raise UsageError(f"{where}: unknown label(s) {unknown[:10]} in {task.label_column!r}; {task.name} "
                             f"knows {known} (by name or id)")


def _examples(task: Task, records: list[Record], ids: dict[str, int]) -> list[Example]:
    if task.kind == "generation":
        return [Example(text, text_pair=pair, target=value) for text, pair, value in records]
    if task.kind == "regression":
        return [Example(text, float(value), text_pair=pair) for text, pair, value in records]
    return [Example(text, ids[value], text_pair=pair) for text, pair, value in records]


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _carve(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices: a seeded 10% (at most MAX_CARVED_VALIDATION) held out of n rows."""
    n_val = min(MAX_CARVED_VALIDATION, max(1, round(n * data_mod.VALIDATION_FRACTION)))
    if n - n_val < 1:
        raise UsageError(f"need at least 2 training rows to carve a validation split from, found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_val:], order[:n_val]


def _pick(items: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of `limit` items (all when None), in their original order."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def _train_limit(task: Task, n: int, limit: int | None) -> int | None:
    if task.train_fraction >= 1:
        return limit
    kept = max(1, round(n * task.train_fraction))
    return kept if limit is None else min(kept, limit)


def _file_parts(task: Task, data, train_file, validation_file, test_file, seed: int,
                notes: list[str]) -> tuple[dict[str, list[Record]], str]:
    """Records per split from local files, and a description of the source."""
    if data is not None:
        records = _file_records(data, task, notes)
        train, validation, test = data_mod.split_indices(len(records), seed)
        parts = {"train": train, "validation": validation, "test": test}
        return {name: [records[i] for i in idx] for name, idx in parts.items()}, os.fspath(data)
    if train_file is None:  # test_file alone (`unipeft test --data`): every row is evaluated
        return {"train": [], "validation": [], "test": _file_records(test_file, task, notes)}, os.fspath(test_file)
    train = _file_records(train_file, task, notes)
    validation = _file_records(validation_file, task, notes) if validation_file else None
    test = _file_records(test_file, task, notes) if test_file else None
    source = ", ".join(os.fspath(p) for p in (train_file, validation_file, test_file) if p)
    if validation is None and test is None:
        idx = data_mod.split_indices(len(train), seed)
        return {name: [train[i] for i in part] for name, part in zip(("train", "validation", "test"), idx)}, source
    if test is None:
        test, validation = validation, None
        notes.append("no test file: the validation file is the test split")
    if validation is None:
        keep, held = _carve(len(train), seed)
        train, validation = [train[i] for i in keep], [train[i] for i in held]
        notes.append(f"validation split: {len(validation)} rows held out of the train file")
    return {"train": train, "validation": validation, "test": test}, source


def _download(task: Task):
    try:
        import datasets
    except ImportError:
        raise UsageError("loading a task from the Hub needs the package 'datasets': pip install datasets") from None
    try:
        return datasets.load_dataset(task.hub_path, task.hub_config, revision=task.hub_revision)
    except OSError as exc:  # ConnectionError, DatasetNotFoundError and the Hub's HTTP errors all are
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot download task {task.name} ({task.hub_path}"
                         f"{', ' + task.hub_config if task.hub_config else ''}): {first}; offline, pass --data FILE "
                         f"(columns: {task.columns_hint()})") from None


def _flat_rows(task: Task, rows: list[dict]) -> list[dict]:
    """Hub rows in the layout of a local file: translation pairs as one column per language, dialogues as
    one (context, response) row per turn."""
    if task.hub_layout == "translation":
        return [dict(row["translation"]) for row in rows]
    if task.hub_layout == "dialogue":
        out = []
        for row in rows:
            turns = list(row["previous_utterance"])
            for free, guided in zip(row["free_messages"], row["guided_messages"]):
                turns += [free, guided]
            seeds = len(row["previous_utterance"])
            for i in range(max(seeds, 1), len(turns)):
                context = "\n".join(turns[max(0, i - DIALOGUE_HISTORY):i])
                out.append({task.text_column: context, task.target_column: turns[i]})
        return out
    return rows


def _hub_records(task: Task, split, name: str, indices: list[int], limit: int | None, seed: int,
                 notes: list[str]) -> list[Record]:
    """Records of the rows `indices` of one Hub split, subsampled to `limit`. Rows are read only where
    sampled, except dialogues: one holds many examples, so those are expanded first, then sampled."""
    where = f"{task.hub_path} {name} split"
    if task.hub_layout != "dialogue":
        indices = _pick(indices, limit, seed)
    rows = _flat_rows(task, split.select(indices).to_list())
    if not rows:
        return []
    records = _records(rows, list(rows[0]), task, where, notes, dedup=False)
    return _pick(records, limit, seed) if task.hub_layout == "dialogue" else records


def _hub_parts(task: Task, seed: int, max_train: int | None, max_eval: int | None,
               notes: list[str]) -> dict[str, list[Record]]:
    hub = _download(task)
    train_name = task.hub_splits["train"]
    train_split = hub[train_name]
    if "validation" in task.hub_splits:
        val_name = task.hub_splits["validation"]
        train_idx, val_split = list(range(len(train_split))), hub[val_name]
        val_idx = list(range(len(val_split)))
    else:
        train_idx, val_idx = _carve(len(train_split), seed)
        val_name, val_split = train_name, train_split
        notes.append(f"validation split: {len(val_idx)} rows held out of the Hub's {train_name!r} split; "
                     f"test split: the Hub's {task.hub_splits['test']!r} split")
    train_limit = _train_limit(task, len(train_idx), max_train)
    parts = {"train": _hub_records(task, train_split, train_name, train_idx, train_limit, seed, notes),
             "validation": _hub_records(task, val_split, val_name, val_idx, max_eval, seed, notes)}
    for ours, theirs in task.hub_splits.items():
        if ours not in ("train", "validation"):
            split = hub[theirs]
            parts[ours] = _hub_records(task, split, theirs, list(range(len(split))), max_eval, seed, notes)
    return parts


def load_task_dataset(task: Task | str, data=None, *, train_file=None, validation_file=None, test_file=None,
                      text_column=None, pair_column=None, label_column=None, target_column=None, direction=None,
                      split_seed: int = 0, max_train_samples: int | None = None,
                      max_eval_samples: int | None = None) -> Dataset:
    """The task's train/validation/test (and extra) splits, from local files when any is given, else from
    the Hub (or, for `tweets`, the embedded corpus, exactly as data.load_dataset reads it).

    Files: `data` alone is split 80/10/10 by `split_seed`. With --train-file, a missing test file is
    replaced by the validation file, and a missing validation split is carved out of the train file;
    a train file alone is split 80/10/10. A test file alone becomes the test split, every row of it.
    Column options override the task's column names. `direction` picks a translation direction.
    """
    task = get_task(task) if isinstance(task, str) else task
    if direction and direction != task.direction:
        task = task.with_direction(direction)
    overrides = {"text_column": text_column, "pair_column": pair_column, "label_column": label_column,
                 "target_column": target_column}
    task = dataclasses.replace(task, **{k: v for k, v in overrides.items() if v})
    files = [p for p in (train_file, validation_file, test_file) if p is not None]
    if data is not None and files:
        raise UsageError("pass either --data FILE or --train-file/--validation-file/--test-file, not both")
    if validation_file is not None and train_file is None:
        raise UsageError("--validation-file needs --train-file")
    local = data is not None or bool(files)
    if (not local and task.name == DEFAULT_TASK) or (task.name == FILE_TASK.name and data is not None):
        return data_mod.load_dataset(data, text_column, label_column, split_seed, max_train_samples, max_eval_samples)
    if not local and task.hub_path is None:
        raise UsageError(f"task {task.name} has no download; pass --data FILE (columns: {task.columns_hint()})")

    notes: list[str] = []
    if local:
        parts, source = _file_parts(task, data, train_file, validation_file, test_file, split_seed, notes)
    else:  # Hub rows are read only where sampled, so they come subsampled already
        parts = _hub_parts(task, split_seed, max_train_samples, max_eval_samples, notes)
        source = f"{task.hub_path}" + (f" ({task.hub_config})" if task.hub_config else "")
    ids, labels = _label_ids(task, parts) if task.kind == "classification" else ({}, [])
    _check_labels(task, [record for records in parts.values() for record in records], ids, source)
    if local:
        limits = {"train": _train_limit(task, len(parts["train"]), max_train_samples)}
        # the parts of one --data file come shuffled: their first rows are a seeded sample, as in data.py
        take = data_mod._limit if data is not None else lambda items, limit: _pick(items, limit, split_seed)
        parts = {name: take(records, limits.get(name, max_eval_samples)) for name, records in parts.items()}
    examples = {name: _examples(task, records, ids) for name, records in parts.items()}
    if not examples["test"]:
        raise UsageError(f"{source}: no usable rows to test on (every row lacks its text or its "
                         f"{task.label_column or task.target_column})")
    return Dataset(train=examples.pop("train"), validation=examples.pop("validation"), test=examples.pop("test"),
                   labels=labels, source=source, notes=notes, extra=examples)
