"""Tiny random-weight models and small data files for tests/test_workflows.py, all built offline.

- BERT (hidden 32, 2 layers) with a WordPiece tokenizer over a word list (whole words, no sub-words).
- T5 and GPT-2 (d_model 32, 2 layers) with a word-level tokenizer: one token per space-separated word and one
  per newline, so prompt layouts ("...\nSentiment:", blank lines between demonstrations) reach the model
  (T5's tokenizer appends </s> to every input and target, GPT-2's does not).
- Data rows whose label or target follows from cue words, so a few epochs of LoRA learn something and the
  metrics are not all zero.
"""
from __future__ import annotations

import csv
import json
import os
import random

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

HIDDEN, LAYERS = 32, 2
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, EOS, UNK, NEWLINE = "<pad>", "</s>", "<unk>", "\n"

FILLER = [f"w{i}" for i in range(30)]
YES_CUES, NO_CUES = ["indeed", "same", "exactly"], ["never", "other", "unlike"]  # pair label 1 / 0
GOOD, BAD = ["great", "love", "superb"], ["awful", "hate", "dull"]  # sentiment and similarity cues
EN = [f"en{i}" for i in range(16)]  # translation: word i of English is word i of "Romanian"
RO = [f"ro{i}" for i in range(16)]
TOPICS = [f"topic{i}" for i in range(6)]
# words of the task templates and prefixes (a word keeps its colon)
TEMPLATE_WORDS = ["translate", "English", "Romanian", "to", "English:", "Romanian:", "Document:", "Summary:",
                  "Review:", "Sentiment:", "negative", "positive", "about", "summarize:"]
WORDS = FILLER + YES_CUES + NO_CUES + GOOD + BAD + EN + RO + TOPICS + TEMPLATE_WORDS


# ---- models ---------------------------------------------------------------------------------------------

def tiny_bert(folder) -> str:
    """A 2-layer random BERT encoder (with its pooler) and a whole-word WordPiece tokenizer."""
    vocab = BERT_SPECIAL + sorted(set(WORDS))
    tokenizer = T.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=False)
    assert tokenizer.tokenize("w1 great indeed") == ["w1", "great", "indeed"]
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    T.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def word_tokenizer(append_eos: bool) -> T.PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate([PAD, EOS, UNK, NEWLINE] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split(NEWLINE, "isolated")])
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    assert tokenizer.tokenize("Review: w1 great\n\nSentiment:") == ["Review:", "w1", "great", "\n", "\n", "Sentiment:"]
    return tokenizer


def tiny_t5(folder) -> str:
    tokenizer = word_tokenizer(append_eos=True)
    torch.manual_seed(0)
    config = T.T5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2,
                        dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    T.T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_gpt2(folder) -> str:
    tokenizer = word_tokenizer(append_eos=False)
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=256,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          initializer_range=0.6)  # wide: the frozen tied embeddings must allow confident logits
    T.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---- data -----------------------------------------------------------------------------------------------

def write_csv(path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def _unique(make, n: int, seed: int) -> list:
    """n rows from make(rng) whose first element (the input) is unique: files are deduplicated on input."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        row = make(rng)
        key = tuple(row[:2]) if len(row) > 2 else row[0]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def pair_rows(n: int, seed: int = 0, noise: float = 0.15) -> list[list]:
    """sentence1, sentence2, label: 1 when sentence2 carries a "yes" cue (flipped with probability `noise`)."""
    def make(rng):
        label = rng.randrange(2)
        second = rng.sample(FILLER, 3)
        second.insert(rng.randrange(4), rng.choice(YES_CUES if label else NO_CUES))
        if rng.random() < noise:
            label = 1 - label
        return [" ".join(rng.sample(FILLER, 4)), " ".join(second), label]
    return _unique(make, n, seed)


def similarity_rows(n: int, seed: int = 1) -> list[list]:
    """sentence1, sentence2, a score in [0, 5] that grows with the good cue words in both sentences."""
    def make(rng):
        goods = rng.randrange(4)
        words = rng.sample(FILLER, 6 - goods) + rng.sample(GOOD, goods)
        rng.shuffle(words)
        score = min(5.0, max(0.0, round(goods * 1.6 + rng.uniform(-0.4, 0.4), 2)))
        return [" ".join(words[:3]), " ".join(words[3:]), score]
    return _unique(make, n, seed)


def translation_rows(n: int, seed: int = 2) -> list[dict]:
    """{"en": ..., "ro": ...}: the same word indices in both languages."""
    def make(rng):
        idx = rng.sample(range(len(EN)), rng.randint(3, 5))
        return [" ".join(EN[i] for i in idx), " ".join(RO[i] for i in idx)]
    return [{"en": en, "ro": ro} for en, ro in _unique(make, n, seed)]


def summary_rows(n: int, seed: int = 3) -> list[dict]:
    """{"document": ..., "summary": "about TOPIC"}: the summary names the topic word hidden in the document."""
    def make(rng):
        topic = rng.choice(TOPICS)
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), topic)
        return [" ".join(words), f"about {topic}"]
    return [{"document": d, "summary": s} for d, s in _unique(make, n, seed)]


def sentiment_rows(n: int, seed: int = 4, noise: float = 0.0) -> list[list]:
    """sentence, label (0 negative, 1 positive from a cue word)."""
    def make(rng):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3)
        words.insert(rng.randrange(4), rng.choice(GOOD if label else BAD))
        if rng.random() < noise:
            label = 1 - label
        return [" ".join(words), label]
    return _unique(make, n, seed)


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under `folder` by relative path: compared before and after a refused command."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found
