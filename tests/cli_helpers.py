"""What the command-line tests share: a tiny random BERT with a word-list tokenizer built offline, labelled
sentences whose label one cue word decides, and the check that a command fails with one clear line.
The `tiny_model` and `tiny_csv` fixtures (tests/conftest.py) are built from these.
"""
from __future__ import annotations

import csv
import os
import random

from unipeft.cli import main

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CUES = {"negative": ["awful", "terrible", "hate"], "neutral": ["okay", "fine", "average"],
        "positive": ["great", "love", "wonderful"]}
FILLER = [f"w{i}" for i in range(40)]
HIDDEN, LAYERS, RANK = 32, 2, 4


def texts(seed: int, n: int) -> list[tuple[str, str]]:
    """Unique sentences: filler words plus one cue word that decides the label."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        label = rng.choice(sorted(CUES))
        words = rng.sample(FILLER, 3)
        words.insert(rng.randrange(4), rng.choice(CUES[label]))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def write_tiny_model(folder, dropout: float = 0.0) -> str:
    """A 2-layer random BERT encoder (seed 0) saved with a WordPiece tokenizer built from the word list."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = SPECIAL + sorted({w for words in CUES.values() for w in words}) + FILLER
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    assert tokenizer.tokenize("w1 great W2") == ["w1", "great", "w2"]  # whole words, no [UNK]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if "PYTEST_XDIST_WORKER" in env:  # two workers on two cores: one thread each
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def fails(capsys, argv, *needles, out=None):
    """`unipeft argv` exits 2 with one stderr line holding every needle, no traceback, and writes no `out`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not os.path.exists(out)
    return err
