"""Batches for sequence classification and regression (single texts or sentence pairs), and the optimiser.

The training loop itself is `trainer.fit`; batches for generation models are in `generation`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader

from .data import Example


class Collator:
    """Tokenises a list of Examples (single texts or sentence pairs) into one padded batch (padding to the
    longest row, not max_length), with class ids, or float values for regression, as labels."""

    def __init__(self, tokenizer, max_length: int, regression: bool = False) -> None:
        self.tokenizer, self.max_length, self.regression = tokenizer, max_length, regression

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
        batch = self.tokenizer([e.text for e in examples], pairs, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch = dict(batch)
        if all(e.label is not None for e in examples):
            batch["labels"] = torch.tensor([e.label for e in examples],
                                           dtype=torch.float if self.regression else torch.long)
        return batch


def make_loader(examples: Sequence[Example], tokenizer, batch_size: int, max_length: int,
                regression: bool = False) -> DataLoader:
    """Batches in order, for evaluation (the trainer shuffles its own)."""
    return DataLoader(list(examples), batch_size=batch_size, collate_fn=Collator(tokenizer, max_length, regression))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (the adapter and the task head)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
