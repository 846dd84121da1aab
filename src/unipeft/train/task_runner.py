"""What a run does with its model for its task: the training batches, the evaluation, and `infer`'s outputs.

One `TaskRunner` per (task, head) pair, shared by `unipeft train`, `test` and `infer`:

    classifier  sequence classification head: argmax over labels; infer prints every label's probability
    regressor   one-output head (STS-B): the value itself
    seq2seq     encoder-decoder LM (T5, BART): generates from `task.source(example)`
    causal      decoder-only LM: generates after `task.prompt(example)`; for classification tasks it scores the
                task's label words instead. With `demos` (--eval-mode icl) every prompt starts with k solved
                training examples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import Example
from .errors import UsageError
from .metrics import compute_metrics
from .tasks import Task

PAIR_SEPARATOR = "\t"  # `unipeft infer` reads a pair task's two sentences from one line, split at a tab


@dataclass
class TaskRunner:
    task: Task
    head: str
    tokenizer: object
    max_length: int = 64
    max_target_length: int = 64
    labels: list[str] = field(default_factory=list)  # the classifier's label names, in head order
    demos: list[Example] | None = None  # --eval-mode icl: demonstrations put in front of every prompt
    search: str = "greedy"
    num_beams: int = 4
    max_new_tokens: int | None = None  # None: the task's default
    batch_size: int = 32

    @property
    def generates(self) -> bool:
        return self.head in ("seq2seq", "causal") and self.task.kind == "generation"

    def collate(self) -> Callable[[list[Example]], dict]:
        """Training batches: tokenised inputs with labels (class ids, values, or target tokens)."""
        from .generation import CausalCollator, Seq2SeqCollator
        from .batches import Collator

        if self.head == "seq2seq":
            return Seq2SeqCollator(self.tokenizer, self.task.source, self.max_length, self.max_target_length)
        if self.head == "causal":
            return CausalCollator(self.tokenizer, self.task.prompt, self.task.answer,
                                  self.max_length + self.max_target_length)
        return Collator(self.tokenizer, self.max_length, regression=self.head == "regressor")

    def _prompt(self, example: Example) -> str:
        from .generation import icl_prompt

        if self.demos:
            return icl_prompt(self.demos, example, self.task.prompt, self.task.answer)
        return self.task.prompt(example)

    def _generation_inputs(self, examples: list[Example]) -> list[str]:
        return [self.task.source(e) if self.head == "seq2seq" else self._prompt(e) for e in examples]

    @torch.no_grad()
    def outputs(self, model, examples: list[Example]) -> list:
        """Per example: class probabilities (classification), a value (regression) or a generated text."""
        from .generation import generate_texts, score_label_words
        from .batches import make_loader, to_device

        device = next(model.parameters()).device
        model.eval()
        if self.generates:
            return generate_texts(model, self.tokenizer, self._generation_inputs(examples),
                                  decoder_only=self.head == "causal", search=self.search, num_beams=self.num_beams,
                                  max_new_tokens=self.max_new_tokens or self.task.max_new_tokens,
                                  max_length=self._prompt_room(), batch_size=self.batch_size, device=device)
        if self.head == "causal":  # a classification task scored on label words
            scores = score_label_words(model, self.tokenizer, [self._prompt(e) for e in examples],
                                       list(self.task.label_words), device=device, batch_size=self.batch_size,
                                       max_length=self._prompt_room())
            return [torch.tensor(row).softmax(-1).tolist() for row in scores]
        out = []
        for batch in make_loader(examples, self.tokenizer, self.batch_size, self.max_length,
                                 regression=self.head == "regressor"):
            batch.pop("labels", None)
            logits = model(**to_device(batch, device)).logits.float()
            out.extend(logits[:, 0].tolist() if self.head == "regressor" else logits.softmax(-1).tolist())
        return out

    def _prompt_room(self) -> int:
        """Tokens a prompt may take: with demonstrations in front the prompt is k + 1 instances long."""
        return self.max_length * (1 + len(self.demos or []))

    def evaluate(self, model, examples: list[Example]) -> dict[str, float]:
        """The task's metrics on `examples` (perplexity from the loss on the references)."""
        outputs = self.outputs(model, examples)
        names = [m for m in self.task.metrics if m != "perplexity"]
        if self.generates:
            result = compute_metrics(names, outputs, [e.target for e in examples])
        elif self.head == "regressor":
            result = compute_metrics(names, outputs, [e.label for e in examples])
        else:
            predictions = [max(range(len(p)), key=p.__getitem__) for p in outputs]
            result = compute_metrics(names, predictions, [e.label for e in examples])
        if "perplexity" in self.task.metrics:
            from .generation import perplexity

            loader = torch.utils.data.DataLoader(examples, batch_size=self.batch_size, collate_fn=self.collate())
            result["perplexity"] = perplexity(model, loader, next(model.parameters()).device)
        return {name: result[name] for name in self.task.metrics}

    def infer(self, model, texts: list[str]) -> list[dict]:
        """For each text: the label with every label's probability, the value, or the generated text."""
        examples = [self._example(text) for text in texts]
        out = []
        for text, output in zip(texts, self.outputs(model, examples)):
            if self.generates:
                out.append({"text": text, "generated": output})
            elif self.head == "regressor":
                out.append({"text": text, "value": output})
            else:
                names = self.labels or list(self.task.labels)
                best = max(range(len(output)), key=output.__getitem__)
                out.append({"text": text, "label": names[best], "probabilities": dict(zip(names, output))})
        return out

    def _example(self, text: str) -> Example:
        if self.task.pair_column:
            first, tab, second = text.partition(PAIR_SEPARATOR)
            if not tab:
                raise UsageError(f"{self.task.name} reads two sentences a line, separated by a tab; found none in "
                                 f"{text[:60]!r}")
            return Example(first, text_pair=second)
        return Example(text)
