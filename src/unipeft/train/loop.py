"""A plain PyTorch training loop for sequence classification: loaders, optimiser, schedule, epochs, predictions.

Each piece is a separate function taking the model, loaders and optimiser as arguments, so moving onto
Accelerate means preparing those objects once and passing `accelerator.backward` as `backward`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

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
                shuffle: bool = False, seed: int = 0, regression: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(examples), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(tokenizer, max_length, regression))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (the adapter and the task head)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the base learning rate, then linear decay to zero."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def train_epoch(model, loader: DataLoader, optimizer, scheduler, device, description: str = "train",
                max_grad_norm: float | None = 1.0, progress: bool = True,
                backward: Callable[[torch.Tensor], None] | None = None, first_step: int = 0) -> float:
    """One pass over `loader`; returns the mean training loss. The bar shows the running mean.
    After each optimizer step the adapters' per-step work runs (AdaLoRA's rank schedule), with the
    run's 0-based step number: `first_step` is the number of steps taken in earlier epochs."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    per_step_work = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    total_loss, seen = 0.0, 0
    bar = tqdm(loader, desc=description, disable=not progress, leave=True, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=first_step):
        batch = to_device(batch, device)
        loss = model(**batch).loss
        (backward or torch.Tensor.backward)(loss)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        if per_step_work is not None:
            per_step_work(step)
        optimizer.zero_grad(set_to_none=True)
        rows = batch["labels"].shape[0]
        total_loss += loss.item() * rows
        seen += rows
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    bar.close()
    return total_loss / max(1, seen)


@torch.no_grad()
def predict(model, loader: DataLoader, device) -> list[int]:
    """Predicted label ids, in loader order."""
    model.eval()
    predictions: list[int] = []
    for batch in loader:
        batch = to_device(batch, device)
        batch.pop("labels", None)
        predictions.extend(model(**batch).logits.argmax(dim=-1).tolist())
    return predictions


def accuracy(predictions: Sequence[int], examples: Sequence[Example]) -> float:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    return sum(p == e.label for p, e in zip(predictions, examples)) / max(1, len(examples))
