"""Every expected value below is worked out by hand in the test, never taken from the code's output."""
import math
import sys

import pytest

from unipeft.train import metrics
from unipeft.train.metrics import GREATER_IS_BETTER, compute_metrics

# Confusion matrix of this pair (positive class 1):
#   tp = positions 0, 1, 6 -> 3;  fn = position 2 -> 1;  fp = position 4 -> 1;  tn = positions 3, 5, 7 -> 3
REFS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 1, 0, 0, 1, 0, 1, 0]


def test_classification_on_a_symmetric_confusion_matrix():
    assert metrics.accuracy(PREDS, REFS) == pytest.approx(6 / 8)  # tp + tn = 6 of 8
    assert metrics.f1(PREDS, REFS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 2tp / (2tp + fp + fn) = 0.75
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / sqrt(4*4*4*4) = 0.5
    assert metrics.matthews(PREDS, REFS) == pytest.approx(0.5)


def test_classification_on_an_asymmetric_confusion_matrix():
    refs = [1, 1, 1, 1, 0, 0, 0, 0]
    preds = [1, 1, 0, 0, 1, 0, 0, 0]  # tp = 2, fn = 2, fp = 1, tn = 3
    assert metrics.accuracy(preds, refs) == pytest.approx(5 / 8)
    assert metrics.f1(preds, refs) == pytest.approx(4 / 7)  # 2*2 / (2*2 + 1 + 2)
    # (2*3 - 1*2) / sqrt((2+1)(2+2)(3+1)(3+2)) = 4 / sqrt(240)
    assert metrics.matthews(preds, refs) == pytest.approx(4 / math.sqrt(240))


def test_matthews_multiclass_and_undefined():
    # three classes, n = 4, correct c = 3 (positions 0, 2, 3);
    # predicted counts {0: 2, 1: 1, 2: 1}, true counts {0: 1, 1: 2, 2: 1}
    # (c*n - sum p_k t_k) / sqrt((n^2 - sum p_k^2)(n^2 - sum t_k^2)) = (12 - (2+2+1)) / sqrt((16-6)(16-6)) = 0.7
    assert metrics.matthews([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.7)
    assert metrics.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # a constant prediction: denominator 0
    assert metrics.f1([0, 0], [0, 0]) == 0.0  # no positive anywhere


def test_pearson_and_spearman_by_hand():
    x = [1, 2, 3, 4, 5]
    y = [2, 4, 5, 4, 5]
    # deviations from the means (3 and 4): dx = -2,-1,0,1,2; dy = -2,0,1,0,1
    # sum dx*dy = 4+0+0+0+2 = 6; sum dx^2 = 10; sum dy^2 = 6
    assert metrics.pearson(x, y) == pytest.approx(6 / math.sqrt(10 * 6))
    # ranks of y with ties averaged: 1, 2.5, 4.5, 2.5, 4.5 (mean 3): dy = -2,-.5,1.5,-.5,1.5
    # sum dx*dy = 4+.5+0-.5+3 = 7; sum dy^2 = 4+.25+2.25+.25+2.25 = 9
    assert metrics.spearman(x, y) == pytest.approx(7 / math.sqrt(10 * 9))
    assert metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # undefined for a constant series


def test_rouge_by_counted_overlaps():
    predictions = ["the cat lay on the rug", "a dog runs"]
    references = ["The cat sat on the mat.", "dogs are running fast"]
    # pair 1: 6 unigrams each, overlap the x2, cat, on = 4 -> P = R = F = 4/6
    # pair 2 (Porter stems of words over 3 letters): pred a, dog, run; ref dog, are, run, fast
    #   overlap dog, run = 2 -> P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert metrics.rouge1(predictions, references) == pytest.approx(100 * (4 / 6 + 4 / 7) / 2)
    # pair 1 bigrams: 5 each, overlap "the cat", "on the" = 2 -> 2/5; pair 2: pred "a dog", "dog run",
    #   ref "dog are", "are run", "run fast": no overlap -> 0
    assert metrics.rouge2(predictions, references) == pytest.approx(100 * (2 / 5 + 0) / 2)
    # pair 1 LCS "the cat on the" = 4 -> 4/6; pair 2 LCS "dog run" = 2 -> 4/7 as for ROUGE-1
    assert metrics.rougeL(predictions, references) == pytest.approx(100 * (4 / 6 + 4 / 7) / 2)


def test_bleu_identical_disjoint_and_partial():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert metrics.bleu([sentence], [sentence]) == pytest.approx(100.0)
    assert metrics.bleu(["alpha beta gamma delta"], [sentence]) == 0.0
    # hypothesis 8 tokens, reference 9 -> brevity penalty exp(1 - 9/8)
    # 1-grams 8/8; 2-grams 6/7 ("the dog" missing); 3-grams 5/6 ("over the dog" missing);
    # 4-grams 4/5 ("jumps over the dog" missing)
    hypothesis = "the quick brown fox jumps over the dog"
    expected = 100 * math.exp(1 - 9 / 8) * (1 * 6 / 7 * 5 / 6 * 4 / 5) ** (1 / 4)
    assert metrics.bleu([hypothesis], [sentence]) == pytest.approx(expected)
    # same length (BP = 1), one word changed: 1-grams 8/9, 2-grams 6/8, 3-grams 4/7, 4-grams 2/6
    expected = 100 * (8 / 9 * 6 / 8 * 4 / 7 * 2 / 6) ** (1 / 4)
    assert metrics.bleu(["the quick brown fox jumped over the lazy dog"], [sentence]) == pytest.approx(expected)


def test_compute_metrics_by_name():
    assert compute_metrics(["f1", "accuracy"], PREDS, REFS) == pytest.approx({"f1": 0.75, "accuracy": 0.75})
    out = compute_metrics(["bleu", "rougeL", "perplexity"], ["a b c d e"], ["a b c d e"])
    assert set(out) == {"bleu", "rougeL"}  # perplexity is the caller's, from the loss
    assert out["bleu"] == pytest.approx(100.0) and out["rougeL"] == pytest.approx(100.0)


def test_greater_is_better_covers_every_metric():
    assert set(GREATER_IS_BETTER) == set(metrics.METRICS) | {"perplexity"}
    assert GREATER_IS_BETTER["perplexity"] is False
    assert all(GREATER_IS_BETTER[name] for name in metrics.METRICS)


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown metric.*'bleu'"):
        compute_metrics(["blue"], [1], [1])
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        metrics.accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["accuracy"], [1, 0], [1])


def test_missing_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(metrics.UsageError, match="pip install sacrebleu"):
        metrics.bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(metrics.UsageError, match="pip install rouge-score"):
        metrics.rouge1(["a"], ["a"])
