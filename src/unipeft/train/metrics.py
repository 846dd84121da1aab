"""Evaluation metrics by name, on the scales Hugging Face's example scripts report them.

Classification metrics take integer class ids, regression metrics floats, generation metrics strings.
`accuracy`, `f1` and `matthews` are fractions (GLUE style); ROUGE and BLEU are on a 0-100 scale.
`perplexity` comes from the evaluation loss, not from predictions: `compute_metrics` skips it and the
caller adds it.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from .errors import UsageError

# True where a larger value is better; the keys are every metric name a task may ask for.
GREATER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "f1": True, "matthews": True,
    "pearson": True, "spearman": True,
    "rouge1": True, "rouge2": True, "rougeL": True, "bleu": True,
    "perplexity": False,
}


# The package behind each metric that needs one: (module to import, pip package).
PACKAGES = {"pearson": ("scipy.stats", "scipy"), "spearman": ("scipy.stats", "scipy"),
            "rouge1": ("rouge_score.rouge_scorer", "rouge-score"), "rouge2": ("rouge_score.rouge_scorer", "rouge-score"),
            "rougeL": ("rouge_score.rouge_scorer", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu")}


def require_packages(names: Sequence[str]) -> None:
    """Fail now, naming the pip package, rather than at the first evaluation after an epoch of training."""
    for name in names:
        if name in PACKAGES:
            _require(*PACKAGES[name])


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"this metric needs the package {package!r}: pip install {package}") from None


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    _check(predictions, references)
    return sum(int(p) == int(r) for p, r in zip(predictions, references)) / len(references)


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Binary F1 of the positive class (id 1), as GLUE reports it for MRPC and QQP; 0.0 with no positives."""
    _check(predictions, references)
    pairs = [(int(p), int(r)) for p, r in zip(predictions, references)]
    tp = sum(p == 1 and r == 1 for p, r in pairs)
    fp = sum(p == 1 and r != 1 for p, r in pairs)
    fn = sum(p != 1 and r == 1 for p, r in pairs)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (the multiclass form, equal to the usual one for two classes); 0.0 when undefined."""
    _check(predictions, references)
    predictions, references = [int(p) for p in predictions], [int(r) for r in references]
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    classes = set(predictions) | set(references)
    predicted = {k: predictions.count(k) for k in classes}
    true = {k: references.count(k) for k in classes}
    covariance = correct * n - sum(predicted[k] * true[k] for k in classes)
    denominator = math.sqrt((n * n - sum(v * v for v in predicted.values())) * (n * n - sum(v * v for v in true.values())))
    return covariance / denominator if denominator else 0.0


def _correlation(kind: str, predictions: Sequence[float], references: Sequence[float]) -> float:
    _check(predictions, references)
    stats = _require(*PACKAGES["pearson"])
    predictions, references = [float(p) for p in predictions], [float(r) for r in references]
    if len(set(predictions)) < 2 or len(set(references)) < 2:
        return 0.0  # a constant series has no correlation; scipy would return NaN
    result = stats.pearsonr(predictions, references) if kind == "pearson" else stats.spearmanr(predictions, references)
    return float(result[0])


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    return _correlation("pearson", predictions, references)


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    return _correlation("spearman", predictions, references)


def rouge(predictions: Sequence[str], references: Sequence[str], types: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measure x 100 per type (rouge1, rouge2, rougeL), Porter-stemmed as in the XSum/CNN papers."""
    _check(predictions, references)
    scorer_module = _require(*PACKAGES["rouge1"])
    scorer = scorer_module.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for kind in types:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100 * total / len(references) for kind, total in totals.items()}


def rouge1(predictions: Sequence[str], references: Sequence[str]) -> float:
    return rouge(predictions, references, ["rouge1"])["rouge1"]


def rouge2(predictions: Sequence[str], references: Sequence[str]) -> float:
    return rouge(predictions, references, ["rouge2"])["rouge2"]


def rougeL(predictions: Sequence[str], references: Sequence[str]) -> float:  # noqa: N802 (the metric's name)
    return rouge(predictions, references, ["rougeL"])["rougeL"]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus sacreBLEU (one reference per prediction, default 13a tokenizer), 0-100."""
    _check(predictions, references)
    sacrebleu = _require(*PACKAGES["bleu"])
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews,
    "pearson": pearson, "spearman": spearman,
    "rouge1": rouge1, "rouge2": rouge2, "rougeL": rougeL, "bleu": bleu,
}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{name: value} for each name; `perplexity` is skipped (see the module docstring)."""
    unknown = [name for name in names if name not in GREATER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(GREATER_IS_BETTER)}")
    _check(predictions, references)
    wanted_rouge = [name for name in names if name in ROUGE_TYPES]
    results = rouge(predictions, references, wanted_rouge) if wanted_rouge else {}
    for name in names:
        if name not in results and name != "perplexity":
            results[name] = METRICS[name](predictions, references)
    return {name: results[name] for name in names if name in results}
