"""Generation models and in-context learning for `unipeft train|test|infer`: collators for seq2seq and
causal-LM training, batched generation, perplexity, and label-word scoring of ICL prompts.

Text comes in through plain callables (`prompt`, `answer`, `source`: Example -> str) so this module does
not depend on how a task formats its examples. A causal prompt has no trailing space; its answer starts
with one (" positive"). Prompt and answer are tokenised separately and their ids concatenated, so the
boundary between them is exact whatever the tokenizer would merge across it.

Padding is done here, not by the tokenizer, so the tokenizer's padding side is never changed and a
tokenizer without a pad token (GPT-2) works: its end-of-sequence token pads.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch

from .data import Example
from .batches import to_device

IGNORE = -100
SEARCHES = ("greedy", "beam")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
    return pad


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) for rows of token ids padded to the longest with `value`."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _keep_end(ids: list[int], room: int) -> list[int]:
    """The last `room` ids (none if room <= 0): prompts lose their beginning, never their end."""
    return ids[max(0, len(ids) - room):] if room > 0 else []


def _config(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def is_encoder_decoder(model) -> bool:
    return bool(getattr(_config(model), "is_encoder_decoder", False))


class Seq2SeqCollator:
    """Encoder inputs from `source(example)`, labels from the target (padding -> -100). T5 and BART build
    their decoder inputs from the labels. `target` defaults to `example.target`."""

    def __init__(self, tokenizer, source: Callable[[Example], str], max_source_length: int,
                 max_target_length: int, target: Callable[[Example], str] | None = None) -> None:
        self.tokenizer, self.source, self.target = tokenizer, source, target or (lambda e: e.target)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        pad = _pad_id(self.tokenizer)
        sources = self.tokenizer([self.source(e) for e in examples], truncation=True,
                                 max_length=self.max_source_length)["input_ids"]
        targets = [self.target(e) for e in examples]
        if any(t is None for t in targets):
            raise ValueError("every example needs a target for seq2seq training")
        targets = self.tokenizer(text_target=targets, truncation=True, max_length=self.max_target_length)["input_ids"]
        input_ids, attention_mask = _pad(sources, pad)
        labels, label_mask = _pad(targets, pad)
        labels[label_mask == 0] = IGNORE
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class CausalCollator:
    """prompt + answer (+ eos) as one right-padded row; the loss covers the answer (and eos) only."""

    def __init__(self, tokenizer, prompt: Callable[[Example], str], answer: Callable[[Example], str],
                 max_length: int) -> None:
        self.tokenizer, self.prompt, self.answer, self.max_length = tokenizer, prompt, answer, max_length

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) after truncation: the prompt loses its start, the answer is kept."""
        answer = _ids(self.tokenizer, self.answer(example), special=False)
        if self.tokenizer.eos_token_id is not None:
            answer = answer + [self.tokenizer.eos_token_id]
        answer = answer[:self.max_length]
        prompt = _keep_end(_ids(self.tokenizer, self.prompt(example), special=True), self.max_length - len(answer))
        return prompt, answer

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        pairs = [self.encode(e) for e in examples]
        input_ids, attention_mask = _pad([p + a for p, a in pairs], _pad_id(self.tokenizer))
        labels = torch.full_like(input_ids, IGNORE)
        for i, (p, a) in enumerate(pairs):
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate_texts(model, tokenizer, inputs: list[str], *, decoder_only: bool, search: str = "greedy",
                   num_beams: int = 4, max_new_tokens: int = 64, max_length: int, batch_size: int = 16,
                   device="cpu") -> list[str]:
    """One generated string per input. Decoder-only models see left-padded prompts (their last `max_length`
    tokens) and return only the continuation, cut at its first newline; encoder-decoder models read the
    input right-truncated to `max_length` tokens. Strings are decoded without special tokens and stripped."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    beams = 1 if search == "greedy" else num_beams
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": beams,
               "pad_token_id": _pad_id(tokenizer)}
    if beams > 1:
        options["early_stopping"] = True
    model.eval()
    texts: list[str] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        if decoder_only:
            rows = [_keep_end(_ids(tokenizer, text, special=True), max_length) for text in chunk]
        else:
            rows = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        input_ids, attention_mask = _pad(rows, options["pad_token_id"], left=decoder_only)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
        if decoder_only:
            out = out[:, input_ids.shape[1]:]
        for row in tokenizer.batch_decode(out, skip_special_tokens=True):
            texts.append((row.split("\n", 1)[0] if decoder_only else row).strip())
    return texts


def _label_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits aligned with batch["labels"], in float32. Prompt tuning adds virtual positions at the start of
    a decoder-only model's logits; the last positions are the real ones."""
    labels = batch["labels"]
    if is_encoder_decoder(model):
        logits = model(**batch).logits
    else:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits[:, -labels.shape[1]:].float()


def _token_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, mask of the real ones), with the causal shift where needed."""
    logits, labels = _label_logits(model, batch), batch["labels"]
    if not is_encoder_decoder(model):
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


@torch.no_grad()
def perplexity(model, loader, device) -> float:
    """exp of the mean negative log-likelihood per label token (every token weighs the same, whatever its batch)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        log_probs, mask = _token_log_probs(model, to_device(batch, device))
        total -= log_probs.sum().item()
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no label tokens to compute a perplexity over")
    return math.exp(total / count)


def icl_prompt(demos: Sequence[Example], query: Example, prompt: Callable[[Example], str],
               answer: Callable[[Example], str], separator: str = "\n\n") -> str:
    """Solved demonstrations, then the query's prompt for the model to continue."""
    return "".join(prompt(d) + answer(d) + separator for d in demos) + prompt(query)


def pick_demos(train: Sequence[Example], k: int, seed: int, labels: int | None) -> list[Example]:
    """k demonstrations drawn with `seed`, in a seeded order. With `labels` (the number of classes) they are
    taken round-robin over the classes in a seeded class order, so classes are balanced while they last."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rng = random.Random(seed)
    if labels is None:
        return rng.sample(list(train), min(k, len(train)))
    pools = [[e for e in train if e.label == c] for c in range(labels)]
    for pool in pools:
        rng.shuffle(pool)
    order = [c for c in range(labels) if pools[c]]
    rng.shuffle(order)
    picked: list[Example] = []
    while len(picked) < k and order:
        for c in list(order):
            if len(picked) == k:
                break
            picked.append(pools[c].pop())
            if not pools[c]:
                order.remove(c)
    rng.shuffle(picked)
    return picked


@torch.no_grad()
def score_label_words(model, tokenizer, prompts: list[str], label_words: Sequence[str], *, device="cpu",
                      batch_size: int = 8, max_length: int) -> list[list[float]]:
    """scores[i][j]: the summed log-probability of the tokens of " " + label_words[j] after prompts[i].
    Decoder-only models read prompt + word, the prompt left-truncated so the row fits `max_length`;
    encoder-decoder models read the prompt (its last `max_length` tokens) and score the word as the decoder
    target. `batch_size` counts (prompt, word) rows."""
    model.eval()
    seq2seq = is_encoder_decoder(model)
    pad = _pad_id(tokenizer)
    words = [_ids(tokenizer, " " + w, special=False) for w in label_words]
    if any(not w for w in words):
        raise ValueError(f"a label word tokenises to nothing: {list(label_words)}")
    if any(len(w) >= max_length for w in words) and not seq2seq:
        raise ValueError(f"max_length {max_length} leaves no room for the prompt before a label word")
    pairs = [(_ids(tokenizer, p, special=True), w) for p in prompts for w in words]
    if not seq2seq and any(not p for p, _ in pairs):
        raise ValueError("an empty prompt gives no position to predict a label word's first token from")
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if seq2seq:
            input_ids, attention_mask = _pad([_keep_end(p, max_length) for p, _ in chunk], pad)
            labels, label_mask = _pad([w for _, w in chunk], pad)
            labels[label_mask == 0] = IGNORE
        else:
            rows = [(_keep_end(p, max_length - len(w)), w) for p, w in chunk]
            input_ids, attention_mask = _pad([p + w for p, w in rows], pad)
            labels = torch.full_like(input_ids, IGNORE)
            for i, (p, w) in enumerate(rows):
                labels[i, len(p):len(p) + len(w)] = torch.tensor(w)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        log_probs, _ = _token_log_probs(model, to_device(batch, device))
        scores.extend(log_probs.sum(-1).tolist())
    n = len(words)
    return [scores[i * n:(i + 1) * n] for i in range(len(prompts))]
