"""Named tasks for `unipeft train --task NAME`: where the data lives, which columns hold what, how a model
sees one instance, and how it is scored (metrics.py).

Data sources (all loadable by `datasets.load_dataset` without a loading script):
- GLUE from nyu-mll/glue. GLUE's test labels are hidden, so our test split is the Hub's validation split and
  our validation split is carved from the Hub's train split (seeded; 10%, at most 1,000 rows).
- XSum's Hub repository still holds a loading script, so it is read from the Hub's Parquet export
  (revision refs/convert/parquet); CNN/DailyMail 3.0.0 and WMT16 ro-en are Parquet repositories.
- Dialogue: ParlAI/blended_skill_talk, whose Hub copy was converted to Parquet (the script removed); we could
  not confirm the same for DailyDialog. Every turn after the two seed utterances is a target, the source being
  the turns before it (at most task_data.DIALOGUE_HISTORY, one per line).
Summarization's main metric is ROUGE-2: copying words from the document earns ROUGE-1/L easily, bigrams less.

Reading the data is task_data.py's job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import data as data_mod
from .data import Example
from .errors import UsageError
from .metrics import GREATER_IS_BETTER

DEFAULT_TASK = "tweets"
LANGUAGES = {"en": "English", "ro": "Romanian"}
FLAGS = {"text": "--text-column", "pair": "--pair-column", "label": "--label-column", "target": "--target-column"}


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    kind: str  # "classification" | "regression" | "generation"
    metrics: tuple[str, ...]  # names in metrics.py; the first is the main one (early stopping, bench)
    text_column: str  # column names in the data (Hub or local file)
    pair_column: str | None = None  # second sentence of pair tasks
    label_column: str | None = None  # classification / regression
    target_column: str | None = None  # generation
    labels: tuple[str, ...] = ()  # class names in id order; empty when discovered from the data
    label_words: tuple[str, ...] = ()  # one short word per class, for scoring with a language model
    hub_path: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None  # a Hub branch, where the main one cannot be loaded
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> Hub split; other keys: Dataset.extra
    hub_layout: str = "columns"  # "columns"; "translation": {"translation": {lang: text}}; "dialogue": BST rows
    train_fraction: float = 1.0  # a seeded share of the train split to keep (mnli-10pct)
    direction: str | None = None  # translation: "source-target" language codes
    source_prefix: str = ""  # prepended to seq2seq inputs (T5 style)
    prompt_template: str  # how a causal LM sees one instance: {text}, {text_pair}; no trailing space
    max_new_tokens: int = 64  # default generation length
    description: str  # one line for --help and the README

    @property
    def greater_is_better(self) -> bool:
        return GREATER_IS_BETTER[self.metrics[0]]

    def prompt(self, example: Example) -> str:
        return self.prompt_template.format(text=example.text, text_pair=example.text_pair or "")

    def answer(self, example: Example) -> str:
        """What follows the prompt, with one leading space: the label word, or the target text."""
        if self.kind == "generation":
            return " " + example.target
        if self.kind == "regression":
            raise ValueError(f"{self.name} is a regression task: its answers are numbers, not words")
        if not self.label_words:
            raise ValueError(f"{self.name} has no label words to answer with")
        return " " + self.label_words[example.label]

    def source(self, example: Example) -> str:
        """The seq2seq encoder input: the prefix, the text, and for pair tasks a space and the second text."""
        text = example.text if example.text_pair is None else f"{example.text} {example.text_pair}"
        return self.source_prefix + text

    def with_direction(self, direction: str) -> Task:
        """This translation task in the other (or the same) direction, e.g. "ro-en"."""
        if self.direction is None:
            raise UsageError(f"--direction is for translation tasks; {self.name} is not one")
        first, second = self.direction.split("-")
        if direction not in (f"{first}-{second}", f"{second}-{first}"):
            raise UsageError(f"{self.name} translates {first}-{second} or {second}-{first}, not {direction!r}")
        source, target = direction.split("-")
        name_of = lambda code: LANGUAGES.get(code, code)  # noqa: E731
        return dataclasses.replace(
            self, direction=direction, text_column=source, target_column=target,
            source_prefix=f"translate {name_of(source)} to {name_of(target)}: ",
            prompt_template=f"{name_of(source)}: {{text}}\n{name_of(target)}:")

    def columns_hint(self) -> str:
        return ", ".join(c for c in (self.text_column, self.pair_column, self.label_column, self.target_column) if c)


GLUE_SPLITS = {"train": "train", "test": "validation"}


def _glue(name: str, config: str, labels: tuple, label_words: tuple, text: str, pair: str | None,
          metrics: tuple, template: str, description: str, **extra) -> Task:
    return Task(name=name, kind="regression" if not labels else "classification", metrics=metrics,
                text_column=text, pair_column=pair, label_column="label", labels=labels, label_words=label_words,
                hub_path="nyu-mll/glue", hub_config=config, hub_splits=extra.pop("hub_splits", GLUE_SPLITS),
                source_prefix=f"{config}: ", prompt_template=template, description=description, **extra)


PAIR = "Sentence 1: {text}\nSentence 2: {text_pair}\n"
NLI = "Premise: {text}\nHypothesis: {text_pair}\nEntailment:"
MNLI_SPLITS = {"train": "train", "test": "validation_matched", "validation_mismatched": "validation_mismatched"}
MNLI = dict(labels=("entailment", "neutral", "contradiction"), label_words=("yes", "maybe", "no"),
            text="premise", pair="hypothesis", metrics=("accuracy",), template=NLI, hub_splits=MNLI_SPLITS)

_TASKS = [
    Task(name="tweets", kind="classification", metrics=("accuracy",), text_column=data_mod.CORPUS_TEXT_COLUMN,
         label_column=data_mod.CORPUS_LABEL_COLUMN, labels=("negative", "neutral", "positive"),
         label_words=("negative", "neutral", "positive"), prompt_template="Tweet: {text}\nSentiment:",
         source_prefix="sentiment: ", description="tweet sentiment: negative, neutral or positive (the embedded corpus)"),
    _glue("cola", "cola", ("unacceptable", "acceptable"), ("no", "yes"), "sentence", None, ("matthews", "accuracy"),
          "Sentence: {text}\nGrammatical:", "GLUE CoLA: is the sentence grammatical (Matthews correlation)"),
    _glue("sst2", "sst2", ("negative", "positive"), ("negative", "positive"), "sentence", None, ("accuracy",),
          "Review: {text}\nSentiment:", "GLUE SST-2: movie-review sentiment, 2 classes"),
    _glue("mrpc", "mrpc", ("not_equivalent", "equivalent"), ("no", "yes"), "sentence1", "sentence2",
          ("f1", "accuracy"), PAIR + "Same meaning:", "GLUE MRPC: are the two sentences paraphrases (F1)"),
    _glue("qqp", "qqp", ("not_duplicate", "duplicate"), ("no", "yes"), "question1", "question2", ("f1", "accuracy"),
          "Question 1: {text}\nQuestion 2: {text_pair}\nSame question:",
          "GLUE QQP: are the two Quora questions duplicates (F1)"),
    _glue("stsb", "stsb", (), (), "sentence1", "sentence2", ("pearson", "spearman"), PAIR + "Similarity:",
          "GLUE STS-B: sentence similarity from 0 to 5, regression (Pearson)"),
    _glue("mnli", "mnli", description="GLUE MNLI: entailment, neutral or contradiction (matched; mismatched extra)",
          **MNLI),
    _glue("mnli-10pct", "mnli", train_fraction=0.1, description="GLUE MNLI trained on a seeded 10% of its train split (39,270 rows; below that "
                                                          "--max-train-samples picks the same rows as mnli)",
          **MNLI),
    _glue("qnli", "qnli", ("entailment", "not_entailment"), ("yes", "no"), "question", "sentence", ("accuracy",),
          "Question: {text}\nSentence: {text_pair}\nAnswered:", "GLUE QNLI: does the sentence answer the question"),
    _glue("rte", "rte", ("entailment", "not_entailment"), ("yes", "no"), "sentence1", "sentence2", ("accuracy",),
          NLI, "GLUE RTE: does the first sentence entail the second"),
    _glue("wnli", "wnli", ("not_entailment", "entailment"), ("no", "yes"), "sentence1", "sentence2", ("accuracy",),
          NLI, "GLUE WNLI: does the sentence with the pronoun replaced follow"),
    Task(name="xsum", kind="generation", metrics=("rouge2", "rouge1", "rougeL"), text_column="document",
         target_column="summary", hub_path="EdinburghNLP/xsum", hub_revision="refs/convert/parquet",
         hub_splits={"train": "train", "validation": "validation", "test": "test"}, source_prefix="summarize: ",
         prompt_template="Document: {text}\nSummary:", max_new_tokens=64,
         description="XSum: one-sentence summaries of BBC articles (ROUGE-2)"),
    Task(name="cnn_dailymail", kind="generation", metrics=("rouge2", "rouge1", "rougeL"), text_column="article",
         target_column="highlights", hub_path="abisee/cnn_dailymail", hub_config="3.0.0",
         hub_splits={"train": "train", "validation": "validation", "test": "test"}, source_prefix="summarize: ",
         prompt_template="Article: {text}\nHighlights:", max_new_tokens=128,
         description="CNN/DailyMail 3.0.0: news highlights (ROUGE-2)"),
    Task(name="wmt16-ro-en", kind="generation", metrics=("bleu",), text_column="en", target_column="ro",
         hub_path="wmt/wmt16", hub_config="ro-en", hub_layout="translation", direction="en-ro",
         hub_splits={"train": "train", "validation": "validation", "test": "test"},
         source_prefix="translate English to Romanian: ", prompt_template="English: {text}\nRomanian:",
         max_new_tokens=128, description="WMT16 English-Romanian translation, en-ro or ro-en with --direction (BLEU)"),
    Task(name="blended_skill_talk", kind="generation", metrics=("bleu", "rougeL", "perplexity"),
         text_column="context", target_column="response", hub_path="ParlAI/blended_skill_talk",
         hub_layout="dialogue", hub_splits={"train": "train", "validation": "validation", "test": "test"},
         prompt_template="Dialogue:\n{text}\nReply:", max_new_tokens=64,
         description="Blended Skill Talk: the next turn of an open-domain dialogue (BLEU)"),
]
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}

# `--data FILE` without --task: a classification file whose labels are read from it (data.py's defaults)
FILE_TASK = Task(name="file", kind="classification", metrics=("accuracy",), text_column=data_mod.FILE_TEXT_COLUMN,
                 label_column=data_mod.FILE_LABEL_COLUMN, prompt_template="Text: {text}\nLabel:",
                 description="a local classification file (columns text, label)")


def known_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str, direction: str | None = None) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return task.with_direction(direction) if direction else task


def task_for(name: str | None, data: str | None = None, direction: str | None = None) -> Task:
    """The task a run uses: the named one (translating in `direction` when given); without a name, the
    embedded tweets or, for a file, FILE_TASK."""
    if name == FILE_TASK.name:  # what metrics.json records for a run on a file without --task
        task = FILE_TASK
    elif name:
        task = get_task(name)
    else:
        task = FILE_TASK if data else TASKS[DEFAULT_TASK]
    # the source prefix and prompt name the languages: the task must be in the direction its data is read in
    return task.with_direction(direction) if direction else task
